//! Property tests of the ledger: random interleavings of reserve, bind success and failure,
//! deletion, kubelet admissions (in any order, each choosing its GPU as the device plugin does,
//! so same-size pods swap GPUs — and pods of one size spanning one or two GPUs swap shapes),
//! readings published late, clock ticks and extender restarts, checked against a model of the
//! world after every step.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::units::VramUnit;

const GIB: u64 = 1 << 30;
const NODES: [&str; 2] = ["n0", "n1"];
const UNITS_PER_GPU: u64 = 8;
const GPUS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        node: usize,
        units: u64,
        /// GPUs the pod spans (its units are a multiple of it).
        gpus: u32,
        spread: bool,
    },
    BindOk(usize),
    BindFail(usize),
    Delete(usize),
    /// The kubelet admits the node's bound pods picked by `mask`, last-bound first when
    /// `reverse` (the plugin cannot tell which pod a request is for).
    Admit {
        node: usize,
        mask: u8,
        reverse: bool,
    },
    /// The device plugin publishes the node's reading.
    Reading {
        node: usize,
        usage_pct: u8,
        noise_mib: u64,
    },
    Tick(u64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 1..=5u64, any::<bool>())
            .prop_map(|(node, units, spread)| Op::Reserve { node, units, gpus: 1, spread }),
        2 => (0..2usize, 1..=3u64, 2..=3u32, any::<bool>())
            .prop_map(|(node, share, gpus, spread)| Op::Reserve {
                node,
                units: share * u64::from(gpus),
                gpus,
                spread
            }),
        3 => any::<usize>().prop_map(Op::BindOk),
        1 => any::<usize>().prop_map(Op::BindFail),
        1 => any::<usize>().prop_map(Op::Delete),
        3 => (0..2usize, any::<u8>(), any::<bool>())
            .prop_map(|(node, mask, reverse)| Op::Admit { node, mask, reverse }),
        2 => (0..2usize, 0..=100u8, 0..2048u64).prop_map(
            |(node, usage_pct, noise_mib)| Op::Reading { node, usage_pct, noise_mib }
        ),
        1 => (1..60u64).prop_map(Op::Tick),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Clone)]
struct WorldPod {
    node: usize,
    /// The GPUs the kubelet allocated, once it has (its truth), sorted: one, or several
    /// with an equal share each.
    gpu: Option<Vec<String>>,
    /// The annotation written at bind (never changes).
    annotated: String,
    units: u64,
    gpus: u32,
    bound: bool,
    assigned_at: SystemTime,
}

struct World {
    now: SystemTime,
    pods: BTreeMap<String, WorldPod>,
    readings: BTreeMap<usize, NodeReading>,
    /// Pods each node's last reading listed.
    listed: BTreeMap<usize, Vec<String>>,
    next: u64,
}

fn config() -> LedgerConfig {
    LedgerConfig {
        headroom_bytes: 256 << 20,
        staleness: Duration::from_secs(90),
    }
}

fn uuid(node: usize, gpu: u32) -> String {
    format!("GPU-{node}-{gpu}")
}

fn record(uid: &str, p: &WorldPod) -> PodRecord {
    PodRecord {
        uid: uid.to_string(),
        namespace: "ns".into(),
        name: uid.to_string(),
        node: NODES[p.node].to_string(),
        gpu_uuid: Some(p.annotated.clone()),
        assigned_at: Some(p.assigned_at),
        request: PodRequest::spanning(VramUnit::Gib1, p.units, p.gpus),
    }
}

impl WorldPod {
    /// Units the pod holds on `gpu` (its share when it holds units there).
    fn units_on(&self, gpu: &str) -> u64 {
        match &self.gpu {
            Some(gpus) if gpus.iter().any(|g| g == gpu) => self.units / gpus.len() as u64,
            _ => 0,
        }
    }
}

/// The sorted, comma-separated form the device plugin compares GPU sets in.
fn canonical(list: &str) -> String {
    let mut gpus = crate::cluster::placement::gpu_uuids(list);
    gpus.sort_unstable();
    gpus.join(",")
}

fn pick<'a>(world: &'a World, n: usize, want_bound: Option<bool>) -> Option<String> {
    let uids: Vec<&'a String> = world
        .pods
        .iter()
        .filter(|(_, p)| want_bound.is_none_or(|b| p.bound == b))
        .map(|(u, _)| u)
        .collect();
    (!uids.is_empty()).then(|| uids[n % uids.len()].clone())
}

/// Free units of each GPU of `node` in the kubelet's books.
fn kubelet_free(world: &World, node: usize) -> BTreeMap<String, u64> {
    let mut free: BTreeMap<String, u64> =
        (0..GPUS).map(|g| (uuid(node, g), UNITS_PER_GPU)).collect();
    for p in world.pods.values().filter(|p| p.node == node) {
        for (gpu, f) in free.iter_mut() {
            *f = f.saturating_sub(p.units_on(gpu));
        }
    }
    free
}

/// The kubelet admits the bound pods of `node` picked by `mask`, one at a time, each taking
/// the units the device plugin prefers (`preferred_units` over `owed_gpus` for its size). Admission
/// order is not the plugin's guess when `reverse`. It must always find an owed GPU with room:
/// falling back (or splitting the pod over two GPUs) means the ledger over-promised.
fn admit(world: &mut World, node: usize, mask: u8, reverse: bool) {
    let mut starting: Vec<String> = world
        .pods
        .iter()
        .filter(|(_, p)| p.node == node && p.bound && p.gpu.is_none())
        .enumerate()
        .filter(|(k, _)| mask & (1 << (k % 8)) != 0)
        .map(|(_, (u, _))| u.clone())
        .collect();
    starting.sort_by_key(|u| (world.pods[u].assigned_at, u.clone()));
    if reverse {
        starting.reverse();
    }
    for uid in starting {
        let units = world.pods[&uid].units;
        let same_size: Vec<crate::PodPlacement> = world
            .pods
            .iter()
            .filter(|(_, p)| p.node == node && p.bound && p.units == units)
            .map(|(u, p)| crate::PodPlacement {
                annotated_gpu: canonical(&p.annotated),
                allocated_gpu: p.gpu.as_ref().map(|g| g.join(",")),
                order_key: format!("{:?}/{u}", p.assigned_at),
            })
            .collect();
        let available: Vec<crate::DeviceId> = kubelet_free(world, node)
            .iter()
            .flat_map(|(gpu, free)| (0..*free).map(|k| crate::DeviceId::new(gpu.as_str(), k)))
            .collect();
        let owed = crate::owed_gpus(&same_size);
        let picked =
            crate::node::inventory::preferred_units(&available, &[], units as usize, &owed);
        let mut gpus: Vec<String> = picked.iter().map(|id| id.gpu_uuid.clone()).collect();
        gpus.sort_unstable();
        gpus.dedup();
        let chosen = Some(gpus)
            .filter(|gpus| picked.len() == units as usize && owed.contains(&gpus.join(",")))
            .unwrap_or_else(|| {
                panic!(
                    "pod {uid} ({units} units) on {}: no owed GPU {owed:?} has room; picked {picked:?}",
                    NODES[node]
                )
            });
        world.pods.get_mut(&uid).unwrap().gpu = Some(chosen);
    }
}

/// The reading the device plugin publishes for `node`: the kubelet's allocations; usage is a
/// share of each limit; live free = total − usage − noise.
fn make_reading(world: &mut World, node: usize, pct: u8, noise: u64) {
    let mut gpus = Vec::new();
    let mut listed_uids = Vec::new();
    for g in 0..GPUS {
        let id = uuid(node, g);
        let total = UNITS_PER_GPU * GIB + GIB / 2;
        let mut used_total = noise << 20;
        let mut pods = Vec::new();
        for (uid, p) in world.pods.iter().filter(|(_, p)| p.node == node) {
            let units = p.units_on(&id);
            if units == 0 {
                continue;
            }
            let limit = units * GIB;
            let used = limit / 100 * u64::from(pct);
            used_total += used;
            listed_uids.push(uid.clone());
            pods.push(ListedPod {
                uid: Some(uid.clone()),
                namespace: "ns".into(),
                name: uid.clone(),
                limit_bytes: limit,
                used_bytes: Some(used),
            });
        }
        gpus.push(PublishedGpu {
            index: g,
            uuid: id,
            free_bytes: total.saturating_sub(used_total),
            units: UNITS_PER_GPU,
            healthy: true,
            health_reason: None,
            pods,
        });
    }
    world.readings.insert(
        node,
        NodeReading {
            observed_at: world.now,
            unit: VramUnit::Gib1,
            gpus,
        },
    );
    world.listed.insert(node, listed_uids);
}

fn check_invariants(ledger: &Ledger, world: &World) {
    let headroom = config().headroom_bytes;
    // The remembered, rendered refusals always say what a fresh check says.
    for name in NODES.iter().chain(&["nowhere"]) {
        for (units, gpus) in [
            (1, 1),
            (3, 1),
            (8, 1),
            (9, 1),
            (4, 2),
            (6, 3),
            (16, 2),
            (12, 4),
        ] {
            let request = PodRequest::spanning(VramUnit::Gib1, units, gpus);
            let fresh = ledger
                .check(name, request, world.now)
                .map_err(|r| Refusal::from(&r));
            for _ in 0..2 {
                assert_eq!(ledger.check_rendered(name, request, world.now), fresh);
            }
            // The unrendered verdict agrees with the rendered one.
            assert_eq!(
                ledger
                    .refusal(name, request, world.now)
                    .map(RefusalKind::is_unresolvable),
                fresh.as_ref().err().map(|r| r.unresolvable)
            );
            // A node scores (1..=10) exactly when it fits.
            for policy in [Policy::Binpack, Policy::Spread] {
                let score = ledger.score(name, request, policy, world.now);
                assert_eq!(score > 0, fresh.is_ok(), "{name} {units} {policy}: {score}");
                assert!(score <= 10);
            }
        }
    }
    for (n, name) in NODES.iter().enumerate() {
        let Some(views) = ledger.gpu_views(name) else {
            continue;
        };
        let listed = world.listed.get(&n).cloned().unwrap_or_default();
        let reading_at = world.readings.get(&n).map(|r| r.observed_at);
        for v in views {
            let held = |p: &&WorldPod| p.node == n && p.units_on(&v.uuid) > 0;
            let on_gpu: Vec<(&String, &WorldPod)> =
                world.pods.iter().filter(|(_, p)| held(p)).collect();
            let world_units: u64 = on_gpu.iter().map(|(_, p)| p.units_on(&v.uuid)).sum();
            // Never more allocated than advertised.
            assert!(
                world_units * GIB <= v.advertised_bytes,
                "GPU {} holds {world_units} units of {}",
                v.uuid,
                v.advertised_bytes / GIB
            );
            // What the reading shows is booked where it shows it.
            let shown: u64 = on_gpu
                .iter()
                .filter(|(u, _)| listed.contains(u))
                .map(|(_, p)| p.units_on(&v.uuid) * GIB)
                .sum();
            assert!(v.assigned_bytes >= shown, "{v:?} shown {shown}");
            // Pods the reading cannot show yet (allocated since, possibly after a swap) are
            // booked in full on the GPU they hold: a same-size pod still booked there is the
            // one whose units they took.
            let unseen: u64 = on_gpu
                .iter()
                .filter(|(u, p)| {
                    !listed.contains(u) || reading_at.is_none_or(|t| p.assigned_at > t)
                })
                .map(|(_, p)| p.units_on(&v.uuid) * GIB)
                .sum();
            assert!(
                v.unobserved >= unseen,
                "{v:?} unseen {unseen} world {:?}",
                world.pods
            );
            assert!(v.assigned_bytes >= world_units * GIB, "{v:?}");
            let live_bound = v
                .live_free
                .saturating_sub(v.unobserved)
                .saturating_sub(headroom);
            assert!(v.effective_free <= live_bound, "{v:?}");
            assert!(v.effective_free <= v.declared_free, "{v:?}");
            assert!(
                v.effective_free <= v.live_free.saturating_sub(unseen),
                "{v:?}"
            );
            assert_eq!(
                v.declared_free,
                v.advertised_bytes.saturating_sub(v.assigned_bytes)
            );
        }
        // Every pod of the node is booked somewhere, waiting or allocated.
        let booked: u64 = views.iter().map(|v| v.assigned_bytes).sum();
        let owned: u64 = world
            .pods
            .values()
            .filter(|p| p.node == n)
            .map(|p| p.units * GIB)
            .sum();
        assert!(
            booked >= owned,
            "node {name}: booked {booked}, pods {owned}"
        );
    }
}

/// A restarted extender: readings and bound pods from the API server, nothing else.
fn rebuild(world: &World) -> Ledger {
    let mut ledger = Ledger::new(config());
    ledger.replace_readings(
        world
            .readings
            .iter()
            .map(|(n, r)| (NODES[*n].to_string(), Ok(r.clone())))
            .collect(),
    );
    ledger.replace_pods(
        world
            .pods
            .iter()
            .filter(|(_, p)| p.bound)
            .map(|(u, p)| record(u, p))
            .collect(),
    );
    ledger
}

fn run(ops: Vec<Op>) {
    let mut world = World {
        now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        pods: BTreeMap::new(),
        readings: BTreeMap::new(),
        listed: BTreeMap::new(),
        next: 0,
    };
    let mut ledger = Ledger::new(config());
    for (n, name) in NODES.iter().enumerate() {
        make_reading(&mut world, n, 0, 0);
        let r = world.readings[&n].clone();
        ledger.set_reading(name, r);
    }
    for op in ops {
        match op {
            Op::Reserve {
                node,
                units,
                gpus,
                spread,
            } => {
                world.next += 1;
                let uid = format!("p{}", world.next);
                let policy = if spread {
                    Policy::Spread
                } else {
                    Policy::Binpack
                };
                let req = ReserveRequest {
                    uid: uid.clone(),
                    namespace: "ns".into(),
                    name: uid.clone(),
                    request: PodRequest::spanning(VramUnit::Gib1, units, gpus),
                };
                let fit = ledger.check(NODES[node], req.request, world.now);
                let before: Vec<GpuView> = ledger
                    .gpu_views(NODES[node])
                    .map(<[GpuView]>::to_vec)
                    .unwrap_or_default();
                match ledger.reserve(req, NODES[node], policy, world.now) {
                    Ok(p) => {
                        assert!(fit.is_ok());
                        // Wherever the pod is booked (after an unpaired swap also on GPUs
                        // still owed its size), the GPU had the room for it.
                        let after = ledger.gpu_views(NODES[node]).unwrap_or_default();
                        for (b, a) in before.iter().zip(after).filter(|(b, _)| b.healthy) {
                            let booked = a.assigned_bytes.saturating_sub(b.assigned_bytes);
                            assert!(booked <= b.effective_free, "{b:?} booked {booked} more");
                        }
                        // No pod of its size over another GPU count waits there for its
                        // units (assigned lately): the device plugin could swap the two.
                        let lately = |at: SystemTime| {
                            world
                                .now
                                .duration_since(at)
                                .map_or(true, |age| age <= super::shape::SHAPE_WAIT_LIMIT)
                        };
                        assert!(
                            !world.pods.values().any(|w| w.node == node
                                && w.gpu.is_none()
                                && lately(w.assigned_at)
                                && w.units == units
                                && w.gpus.max(1) != gpus.max(1)),
                            "a {units}-unit pod over {gpus} GPUs placed beside a waiting one of its size"
                        );
                        // N distinct GPUs, by index.
                        assert_eq!(p.gpu_uuids.len(), gpus as usize);
                        assert!(p.gpu_indices.windows(2).all(|w| w[0] < w[1]));
                        world.pods.insert(
                            uid,
                            WorldPod {
                                node,
                                gpu: None,
                                annotated: p.gpu_uuid,
                                units,
                                gpus,
                                bound: false,
                                assigned_at: world.now,
                            },
                        );
                    }
                    Err(e) => {
                        assert!(fit.is_err(), "check passed but reserve failed: {e}");
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
            Op::BindOk(n) => {
                if let Some(uid) = pick(&world, n, Some(false)) {
                    let p = world.pods.get_mut(&uid).unwrap();
                    p.bound = true;
                    let rec = record(&uid, p);
                    ledger.observe_pod(rec);
                }
            }
            Op::BindFail(n) => {
                if let Some(uid) = pick(&world, n, Some(false)) {
                    world.pods.remove(&uid);
                    assert!(ledger.release(&uid));
                }
            }
            Op::Delete(n) => {
                if let Some(uid) = pick(&world, n, None) {
                    world.pods.remove(&uid);
                    assert!(ledger.forget_pod(&uid));
                }
            }
            Op::Admit {
                node,
                mask,
                reverse,
            } => admit(&mut world, node, mask, reverse),
            Op::Reading {
                node,
                usage_pct,
                noise_mib,
            } => {
                make_reading(&mut world, node, usage_pct, noise_mib);
                let r = world.readings[&node].clone();
                ledger.set_reading(NODES[node], r);
            }
            Op::Tick(secs) => world.now += Duration::from_secs(secs),
            Op::Restart => {
                // Binds in flight die with the extender. The restarted extender reads the
                // plugins' readings as they are by then: published allocations are seconds old.
                world.pods.retain(|_, p| p.bound);
                for n in 0..NODES.len() {
                    make_reading(&mut world, n, 50, 0);
                }
                ledger = rebuild(&world);
            }
        }
        check_invariants(&ledger, &world);
        // A restart from the same API state always reaches the same books for bound pods.
        // (A deleted waiting pod kept on the books is known to this extender only.)
        let unbound = world.pods.values().any(|p| !p.bound);
        if !unbound && !ledger.keeps_departed() {
            let fresh = rebuild(&world);
            for name in NODES {
                assert_eq!(fresh.gpu_views(name), ledger.gpu_views(name), "node {name}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_interleaving_overcommits_or_overstates_free_memory(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
