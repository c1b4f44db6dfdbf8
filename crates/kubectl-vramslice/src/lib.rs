//! `kubectl vramslice`: GPU memory per node and GPU (`nodes`), per pod (`pods`), per DRA claim
//! (`claims`), and why a pending pod does not fit (`explain <pod>`).
//!
//! Data enters from the API server through the user's kubeconfig (GpuNodes, pods, events,
//! ResourceClaims and ResourceSlices; all read-only) and leaves as a table, JSON or YAML on stdout. The numbers come from the same
//! conversions and ledger the extender uses (`vramslice_api::convert`,
//! `vramslice_core::cluster::ledger`), so `explain` gives the extender's own reasons.
//!
//! Exit codes (see [`Exit`]): 0 success; 1 error (API server, kubeconfig, output); 2 usage
//! (bad flags, from clap); 3 not found (the pod, or the GpuNode CRD); 4 `explain`: the pod fits
//! on no node now.

pub mod dra;
pub mod explain;
mod kubeconfig;
pub mod model;
pub mod render;
pub mod settings;

use std::time::SystemTime;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::ListParams;
use kube::{Api, Client};
use vramslice_api::GpuNode;
use vramslice_core::cluster::ledger::LedgerConfig;

use crate::render::{Format, Style};
pub use kubeconfig::{ClientError, client, user_kubeconfig};

/// Exit codes scripts can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success (for `explain`: the pod is bound, or fits on some node).
    Ok = 0,
    /// The API server, the kubeconfig or the output failed.
    Error = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// The named pod, or the GpuNode CRD, does not exist.
    NotFound = 3,
    /// `explain`: the pod fits on no node now (no node has room, or its request cannot be
    /// placed as written).
    DoesNotFit = 4,
}

/// `kubectl vramslice` command line.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-vramslice",
    version,
    about = "GPU memory (VRAM) per node, per pod, and why a pod does not fit"
)]
pub struct Cli {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "table",
        global = true
    )]
    pub output: Format,
    /// Colour: auto (only on a terminal, and not when NO_COLOR is set), always, never.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub color: ColorChoice,
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (default: the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig cluster to use (default: the context's), as kubectl's --cluster.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// Kubeconfig user to use (default: the context's), as kubectl's --user.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// User to impersonate, as kubectl's --as.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub impersonate: Option<String>,
    /// Group to impersonate (repeat for several), as kubectl's --as-group.
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    pub impersonate_groups: Vec<String>,
    /// How long one request may take before it fails ("0": no limit; "30s", "1m", or seconds),
    /// as kubectl's --request-timeout. Default 30s.
    #[arg(long, global = true)]
    pub request_timeout: Option<String>,
    /// Safety margin the extender keeps free per GPU (its `headroom`), for effective free
    /// memory. Default: the extender's own setting, read from its ConfigMap (labelled
    /// app.kubernetes.io/component=scheduler), else 512Mi with a warning.
    #[arg(long, global = true)]
    pub headroom: Option<String>,
    /// Reading age after which the extender treats a GPU as stale (its `staleness`). Default:
    /// the extender's own setting, as for --headroom, else 90s.
    #[arg(long, global = true)]
    pub staleness: Option<String>,
    /// Evaluate at this time (RFC 3339) instead of now; for tests and post-mortems.
    #[arg(long, hide = true, global = true)]
    pub now: Option<String>,
    /// What to show.
    #[command(subcommand)]
    pub command: Command,
}

/// Colour choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Only on a terminal without NO_COLOR.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per node and GPU: model, total, live used, allocated, live free, effective free, health.
    Nodes,
    /// Per pod that requests VRAM: node, GPU, limit, live usage.
    Pods {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// DRA claims of vramslice devices: pods, node, GPUs, granted and live used memory.
    Claims {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Why a pod does (not) fit: the extender's verdict for every GPU node (for a pod with
    /// DRA claims, each node's device room).
    Explain {
        /// The pod's name.
        pod: String,
    },
}

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A flag value that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being read.
        what: String,
        /// Why it failed.
        source: kube::Error,
    },
    /// Output failed.
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

impl PluginError {
    /// The exit code for this failure.
    pub fn exit(&self) -> Exit {
        match self {
            PluginError::Usage(_) => Exit::Usage,
            PluginError::NotFound(_) => Exit::NotFound,
            _ => Exit::Error,
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether the API server refused a read for want of permission.
fn is_forbidden(e: &PluginError) -> bool {
    matches!(e, PluginError::Kube { source: kube::Error::Api(s), .. } if s.code == 403)
}

/// Whether to colour, given the choice, whether stdout is a terminal and `NO_COLOR`.
pub fn use_color(choice: ColorChoice, stdout_is_tty: bool, no_color_env: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => stdout_is_tty && !no_color_env,
    }
}

/// The ledger settings for `cli` and the warning to print, if any (see [`settings`]): the
/// extender's ConfigMap is read only when a flag is missing.
async fn ledger_config(
    cli: &Cli,
    client: &Client,
) -> Result<(LedgerConfig, Option<String>), PluginError> {
    let found = if cli.headroom.is_some() && cli.staleness.is_some() {
        None
    } else {
        Some(extender_config(client).await)
    };
    settings::resolve(cli.headroom.as_deref(), cli.staleness.as_deref(), found)
}

/// The extender configuration the chart installs: `extender.yaml` of a ConfigMap labelled as
/// the scheduler component, in any namespace; why not, as text (a user may not list
/// ConfigMaps: the caller then uses the defaults and says so).
async fn extender_config(client: &Client) -> Result<settings::Found, String> {
    let listed = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default().labels(settings::SCHEDULER_CONFIG_SELECTOR))
        .await
        .map_err(|e| format!("cannot list ConfigMaps: {e}"))?;
    let candidates: Vec<(String, String)> = listed
        .items
        .into_iter()
        .filter_map(|cm| {
            let text = cm.data?.remove(settings::EXTENDER_CONFIG_KEY)?;
            let source = format!(
                "{}/{}",
                cm.metadata.namespace.unwrap_or_default(),
                cm.metadata.name.unwrap_or_default()
            );
            Some((source, text))
        })
        .collect();
    settings::pick(&candidates)
}

fn now(cli: &Cli) -> Result<SystemTime, PluginError> {
    match &cli.now {
        None => Ok(SystemTime::now()),
        Some(t) => vramslice_api::convert::parse_time(t)
            .map_err(|e| PluginError::Usage(format!("--now: {e}"))),
    }
}

async fn gpunodes(client: &Client) -> Result<Vec<GpuNode>, PluginError> {
    Api::<GpuNode>::all(client.clone()).list(&ListParams::default()).await.map(|l| l.items).map_err(|e| {
        if is_not_found(&e) {
            PluginError::NotFound(
                "the GpuNode CRD (gpunodes.vramslice.io) is not installed: install vramslice first".into(),
            )
        } else {
            PluginError::Kube { what: "list gpunodes".into(), source: e }
        }
    })
}

async fn pods(client: &Client, namespace: Option<&str>) -> Result<Vec<Pod>, PluginError> {
    let api: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let what = format!(
        "list pods{}",
        namespace.map(|n| format!(" in {n}")).unwrap_or_default()
    );
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|source| PluginError::Kube { what, source })
}

/// The pods of all namespaces for the ledger, or, for a user who may list pods in `namespace`
/// only, that namespace's and a warning: pods of other namespaces that wait to start on a GPU
/// are then not counted (those that run are, from the GpuNode status).
async fn ledger_pods(
    client: &Client,
    namespace: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Pod>, PluginError> {
    match pods(client, None).await {
        Err(e) if is_forbidden(&e) => {
            warnings.push(format!(
                "{e}: only pods of namespace {namespace} are counted among those waiting to start"
            ));
            pods(client, Some(namespace)).await
        }
        read => read,
    }
}

async fn claims(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Vec<ResourceClaim>, PluginError> {
    let api: Api<ResourceClaim> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|source| PluginError::Kube {
            what: "list resourceclaims".into(),
            source,
        })
}

async fn slices(client: &Client) -> Result<Vec<ResourceSlice>, PluginError> {
    Api::<ResourceSlice>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|source| PluginError::Kube {
            what: "list resourceslices".into(),
            source,
        })
}

/// What one command printed, and how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// For stdout.
    pub text: String,
    /// The exit code.
    pub exit: Exit,
    /// For stderr: what the result rests on that the user should know (the extender's
    /// settings could not be read, so its defaults were used).
    pub warnings: Vec<String>,
    /// For stderr, as it is: what an empty table means (stdout stays empty, as kubectl's).
    pub note: Option<&'static str>,
}

impl Outcome {
    fn new(text: String, exit: Exit) -> Self {
        Outcome {
            text,
            exit,
            warnings: Vec::new(),
            note: None,
        }
    }

    /// An outcome of a table of `rows` rows; `empty` is said on stderr when there are none.
    fn table(text: String, rows: usize, format: Format, empty: &'static str) -> Self {
        let mut outcome = Outcome::new(text, Exit::Ok);
        outcome.note = (rows == 0 && format == Format::Table).then_some(empty);
        outcome
    }
}

/// What a read the output can do without gave: its items, or none and a warning saying what
/// is `without` them.
fn or_warn<T>(
    read: Result<Vec<T>, PluginError>,
    without: &str,
    warnings: &mut Vec<String>,
) -> Vec<T> {
    read.unwrap_or_else(|e| {
        warnings.push(format!("{e}: shown {without}"));
        Vec::new()
    })
}

/// Run one command against `client`.
pub async fn run(cli: &Cli, client: &Client, style: Style) -> Result<Outcome, PluginError> {
    let now = now(cli)?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match &cli.command {
        Command::Nodes => {
            let (config, warning) = ledger_config(cli, client).await?;
            let gns = gpunodes(client).await?;
            let mut warnings = Vec::from_iter(warning);
            let all_pods = ledger_pods(client, &namespace, &mut warnings).await?;
            let ledger = model::build_ledger(&gns, &all_pods, config);
            let rows = model::node_rows(&gns, &ledger, config, now);
            let text = match cli.output {
                Format::Table => render::nodes_table(&rows, style),
                f => render::structured(&rows, f)?,
            };
            let mut outcome = Outcome::table(text, rows.len(), cli.output, render::NO_NODES);
            outcome.warnings = warnings;
            Ok(outcome)
        }
        Command::Pods { all_namespaces } => {
            // GpuNodes are cluster-scoped: a user who may read pods in a namespace only still
            // gets them, placed by their annotation, without live use, and a warning.
            let ns = (!all_namespaces).then_some(namespace.as_str());
            let shown = pods(client, ns).await?;
            let mut warnings = Vec::new();
            let gns = or_warn(gpunodes(client).await, "without live use", &mut warnings);
            let (rows, unreadable) = model::pod_rows_and_unreadable(&gns, &shown);
            warnings.extend(unreadable);
            let text = match cli.output {
                Format::Table => render::pods_table(&rows, style),
                f => render::structured(&rows, f)?,
            };
            let mut outcome = Outcome::table(text, rows.len(), cli.output, render::NO_PODS);
            outcome.warnings = warnings;
            Ok(outcome)
        }
        Command::Claims { all_namespaces } => {
            // Listed in the namespace asked for only (a user may read claims there alone):
            // the rows take nothing but each device's GPU UUID from the rooms.
            // ResourceSlices and GpuNodes are cluster-scoped: a user without them still gets
            // the claims, without GPU UUIDs or live use, and a warning.
            let ns = (!all_namespaces).then_some(namespace.as_str());
            let shown = claims(client, ns).await?;
            let mut warnings = Vec::new();
            let found_slices = or_warn(slices(client).await, "without GPU UUIDs", &mut warnings);
            let found_gpunodes = or_warn(gpunodes(client).await, "without live use", &mut warnings);
            let rooms = dra::device_rooms(&found_slices, &shown);
            let rows = dra::claim_rows(&shown, &rooms, &found_gpunodes);
            let text = match cli.output {
                Format::Table => render::claims_table(&rows, style),
                f => render::structured(&rows, f)?,
            };
            let mut outcome = Outcome::table(text, rows.len(), cli.output, render::NO_CLAIMS);
            outcome.warnings = warnings;
            Ok(outcome)
        }
        Command::Explain { pod } => {
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let target = api.get(pod).await.map_err(|e| {
                if is_not_found(&e) {
                    PluginError::NotFound(format!("pod {namespace}/{pod} not found"))
                } else {
                    PluginError::Kube {
                        what: format!("get pod {namespace}/{pod}"),
                        source: e,
                    }
                }
            })?;
            let (config, warning) = ledger_config(cli, client).await?;
            let gns = gpunodes(client).await?;
            let mut warnings = Vec::from_iter(warning);
            let all_pods = ledger_pods(client, &namespace, &mut warnings).await?;
            let ledger = model::build_ledger(&gns, &all_pods, config);
            // By UID too: a pod of the same name before this one (a StatefulSet's, a Job's)
            // left events of its own, as `kubectl describe` knows.
            let uid = target.metadata.uid.as_deref().unwrap_or_default();
            let events: Vec<Event> = Api::<Event>::namespaced(client.clone(), &namespace)
                .list(&ListParams::default().fields(&format!(
                    "involvedObject.kind=Pod,involvedObject.name={pod},involvedObject.uid={uid}"
                )))
                .await
                .map(|l| l.items)
                .map_err(|source| PluginError::Kube {
                    what: format!("list events of {namespace}/{pod}"),
                    source,
                })?;
            let mut e = explain::explain(&target, &gns, &ledger, &events, now);
            if e.state == explain::PodState::NoVram && dra::pod_has_claims(&target) {
                // Every claim on the devices tells what is left of them; a user who may read
                // claims in this namespace only gets the pod's claims judged on those alone.
                let all_claims = match claims(client, None).await {
                    Err(e) if is_forbidden(&e) => {
                        warnings.push(format!(
                            "{e}: devices' shares are judged by the claims of namespace {namespace} alone"
                        ));
                        claims(client, Some(&namespace)).await?
                    }
                    read => read?,
                };
                let found_slices = or_warn(
                    slices(client).await,
                    "without the devices' capacity",
                    &mut warnings,
                );
                let rooms = dra::device_rooms(&found_slices, &all_claims);
                let (names, _) = dra::pod_claim_names(&target);
                let pod_claims: Vec<ResourceClaim> = all_claims
                    .into_iter()
                    .filter(|c| {
                        c.metadata.namespace.as_deref() == Some(namespace.as_str())
                            && c.metadata.name.as_ref().is_some_and(|n| names.contains(n))
                    })
                    .collect();
                dra::explain_claims(&mut e, &target, &pod_claims, &rooms);
            }
            let code = match e.state {
                explain::PodState::Pending { fits_on: 0 }
                | explain::PodState::InvalidRequest { .. } => Exit::DoesNotFit,
                _ => Exit::Ok,
            };
            let text = match cli.output {
                Format::Table => render::explanation_text(&e, style),
                f => render::structured(&e, f)?,
            };
            let mut outcome = Outcome::new(text, code);
            outcome.warnings = warnings;
            Ok(outcome)
        }
    }
}
