use super::*;
use proptest::prelude::*;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn file(limit: u64) -> FileRead {
    FileRead::Text(limit_file_content(limit, "GPU-f"))
}

fn gpus(pairs: &[(&str, u64)]) -> GpuLimits {
    GpuLimits::new(pairs.iter().copied()).unwrap()
}

fn single(limit_bytes: u64, gpu_uuid: &str) -> LimitFile {
    LimitFile::Single {
        limit_bytes,
        gpu_uuid: gpu_uuid.into(),
    }
}

/// The single-limit rule as it was before per-GPU limits: one environment variable.
fn resolve_single(env_limit: Option<&str>, files: &[(String, FileRead)]) -> (Limits, Vec<String>) {
    let mut msgs = Vec::new();
    let got = resolve_limits(LimitEnv::single(env_limit), files, &mut msgs).limits;
    (got, msgs)
}

fn as_single(limits: &Limits) -> Option<u64> {
    match limits {
        Limits::Unlimited => None,
        Limits::Single(l) => Some(*l),
        Limits::PerGpu(g) => panic!("single-limit inputs gave per-GPU limits {g}"),
    }
}

#[test]
fn limit_file_round_trips() {
    let text = limit_file_content(3 << 30, "GPU-b");
    assert_eq!(text, "limit=3221225472\ngpu=GPU-b\n");
    assert_eq!(parse_limit_file(&text), Ok(single(3 << 30, "GPU-b")));
    assert_eq!(
        parse_limit_file("# written by vramslice\n\n limit = 5 \n"),
        Ok(single(5, ""))
    );
}

#[test]
fn per_gpu_limit_file_round_trips() {
    let text = limits_file_content(&[("GPU-a", 1 << 30), ("GPU-b", 2 << 30)]).unwrap();
    assert_eq!(text, "limits=GPU-a:1073741824,GPU-b:2147483648\n");
    assert_eq!(
        parse_limit_file(&text),
        Ok(LimitFile::PerGpu(gpus(&[
            ("GPU-a", 1 << 30),
            ("GPU-b", 2 << 30)
        ])))
    );
    assert_eq!(
        parse_limit_file("# two GPUs\n limits = GPU-b : 7 , GPU-a:5\n"),
        Ok(LimitFile::PerGpu(gpus(&[("GPU-b", 7), ("GPU-a", 5)]))),
        "blanks ignored, order kept"
    );
    // One GPU: the single-GPU form, which readers of the old format understand.
    let one = limits_file_content(&[("GPU-x", 9)]).unwrap();
    assert_eq!(one, limit_file_content(9, "GPU-x"));
    assert_eq!(parse_limit_file(&one), Ok(single(9, "GPU-x")));
    // The writer refuses what the parser would refuse.
    assert_eq!(limits_file_content::<&str>(&[]), Err(GpuLimitsError::Empty));
    assert_eq!(
        limits_file_content(&[("GPU-a", 1), ("GPU-a", 2)]),
        Err(GpuLimitsError::Duplicate("GPU-a".into()))
    );
    assert_eq!(
        limits_file_content(&[("GPU:a", 1), ("GPU-b", 2)]),
        Err(GpuLimitsError::BadUuid("GPU:a".into()))
    );
}

#[test]
fn limit_file_errors_name_the_problem() {
    assert_eq!(parse_limit_file(""), Err(LimitFileError::MissingLimit));
    assert_eq!(
        parse_limit_file("gpu=x\n"),
        Err(LimitFileError::MissingLimit)
    );
    for bad in [
        "limit=",
        "limit=-1",
        "limit=2Gi",
        "limit=1e9",
        "limit=99999999999999999999999",
        "limit=+5",
    ] {
        assert!(
            matches!(parse_limit_file(bad), Err(LimitFileError::BadLimit(_))),
            "{bad}"
        );
    }
    assert_eq!(
        parse_limit_file("limit=5\nlimit=9999\n"),
        Err(LimitFileError::BadLine {
            line: 2,
            text: "limit=9999".into()
        })
    );
    assert!(matches!(
        parse_limit_file("limit=5\nextra=1"),
        Err(LimitFileError::BadLine { line: 2, .. })
    ));
    assert!(matches!(
        parse_limit_file("nonsense"),
        Err(LimitFileError::BadLine { line: 1, .. })
    ));
    let long = format!("limit=5\n#{}", "x".repeat(LIMIT_FILE_MAX_BYTES));
    assert!(matches!(
        parse_limit_file(&long),
        Err(LimitFileError::TooLong(_))
    ));
    let msg = parse_limit_file("limit=abc").unwrap_err().to_string();
    assert!(msg.contains("\"abc\""), "{msg}");
}

#[test]
fn per_gpu_limit_file_errors_name_the_problem() {
    let err = |text: &str| parse_limit_file(text).unwrap_err();
    // Both forms in one file, in either order, with limit= or gpu=.
    for (text, line, key, other) in [
        ("limits=GPU-a:1\nlimit=5\n", 2, "limit", "limits"),
        ("limit=5\nlimits=GPU-a:1\n", 2, "limits", "limit"),
        ("gpu=GPU-a\nlimits=GPU-a:1\n", 2, "limits", "gpu"),
        ("limits=GPU-a:1\n\ngpu=GPU-a\n", 3, "gpu", "limits"),
    ] {
        let e = err(text);
        assert_eq!(
            e,
            LimitFileError::Conflict {
                line,
                key: key.into(),
                other: other.into()
            },
            "{text:?}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("{key}=")) && shown.contains(&format!("{other}=")),
            "{shown}"
        );
    }
    assert!(matches!(
        err("limits=GPU-a:1\nlimits=GPU-b:2\n"),
        LimitFileError::BadLine { line: 2, .. }
    ));
    for (text, want) in [
        ("limits=", GpuLimitsError::Empty),
        ("limits=  ", GpuLimitsError::Empty),
        (
            "limits=GPU-a:1,GPU-a:2",
            GpuLimitsError::Duplicate("GPU-a".into()),
        ),
        ("limits=GPU-a", GpuLimitsError::BadEntry("GPU-a".into())),
        ("limits=GPU-a:1,", GpuLimitsError::BadEntry(String::new())),
        ("limits=:5", GpuLimitsError::BadUuid(String::new())),
        ("limits=GPU a:5", GpuLimitsError::BadUuid("GPU a".into())),
        ("limits=GPU/a:5", GpuLimitsError::BadUuid("GPU/a".into())),
        (
            "limits=GPU-a:1:2",
            GpuLimitsError::BadBytes {
                uuid: "GPU-a".into(),
                value: "1:2".into(),
                reason: "not a decimal number of bytes".into(),
            },
        ),
    ] {
        assert_eq!(err(text), LimitFileError::BadLimits(want), "{text:?}");
    }
    for bytes in ["", "2Gi", "-1", "+5", "1.5", "99999999999999999999999"] {
        let text = format!("limits=GPU-a:1,GPU-b:{bytes}");
        match err(&text) {
            LimitFileError::BadLimits(GpuLimitsError::BadBytes { uuid, value, .. }) => {
                assert_eq!((uuid.as_str(), value.as_str()), ("GPU-b", bytes), "{text}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    let long_uuid = format!("GPU-{}", "a".repeat(GPU_UUID_MAX_LEN));
    assert!(matches!(
        err(&format!("limits={long_uuid}:1")),
        LimitFileError::BadLimits(GpuLimitsError::BadUuid(_))
    ));
    let shown = err("limits=GPU-a:1,GPU-a:2").to_string();
    assert!(
        shown.contains("limits=") && shown.contains("GPU-a is listed twice"),
        "{shown}"
    );
    let shown = err("limits=GPU-a:lots").to_string();
    assert!(
        shown.contains("GPU-a") && shown.contains("\"lots\""),
        "{shown}"
    );
}

#[test]
fn gpu_limits_keep_order_and_answer_lookups() {
    let g = GpuLimits::parse_env("GPU-b:2Gi, GPU-a:1073741824").unwrap();
    assert_eq!(g.len(), 2);
    assert!(!g.is_empty());
    assert_eq!(g.first(), ("GPU-b", 2 << 30));
    assert_eq!(g.get("GPU-a"), Some(1 << 30));
    assert_eq!(g.get("GPU-c"), None);
    assert_eq!(
        g.iter().collect::<Vec<_>>(),
        vec![("GPU-b", 2 << 30), ("GPU-a", 1 << 30)]
    );
    assert_eq!(g.to_string(), "GPU-b:2147483648,GPU-a:1073741824");
    assert!(
        GpuLimits::parse("GPU-b:2Gi").is_err(),
        "the file takes decimal bytes only"
    );
    let limits = Limits::PerGpu(g);
    assert_eq!(limits.for_gpu("GPU-a"), Some(1 << 30));
    assert_eq!(limits.for_gpu("GPU-z"), Some(0), "not listed: nothing");
    assert_eq!(Limits::Single(7).for_gpu("GPU-z"), Some(7));
    assert_eq!(Limits::Unlimited.for_gpu("GPU-z"), None);
    assert!(!Limits::Unlimited.is_limited() && Limits::Single(0).is_limited());
}

/// Every environment value against every kind of file, for the fixed and the named path, with
/// only the single-limit inputs: the rule as it always was.
#[test]
fn single_limit_resolution_is_exhaustively_the_rule() {
    let envs: [Option<&str>; 6] = [
        None,
        Some(""),
        Some("50Mi"),
        Some("300Mi"),
        Some("lots"),
        Some("0"),
    ];
    let reads = || {
        vec![
            None,
            Some(FileRead::Missing),
            Some(file(100 * MIB)),
            Some(file(200 * MIB)),
            Some(FileRead::Text("limit=oops".into())),
            Some(FileRead::Error("permission denied".into())),
        ]
    };
    let mut cases = 0;
    for env in envs {
        for fixed in reads() {
            for named in reads() {
                let files: Vec<(String, FileRead)> =
                    [("/fixed", fixed.clone()), ("/named", named.clone())]
                        .into_iter()
                        .filter_map(|(p, r)| r.map(|r| (p.to_owned(), r)))
                        .collect();
                let (limits, msgs) = resolve_single(env, &files);
                let got = as_single(&limits);
                cases += 1;
                let env_ok = env.and_then(|e| crate::parse_bytes(e.trim()).ok());
                let env_bad = env.is_some_and(|e| !e.trim().is_empty() && env_ok.is_none());
                let present: Vec<&FileRead> = files
                    .iter()
                    .map(|(_, r)| r)
                    .filter(|r| **r != FileRead::Missing)
                    .collect();
                let file_limits: Vec<u64> = present
                    .iter()
                    .map(|r| match r {
                        FileRead::Text(t) => match parse_limit_file(t) {
                            Ok(LimitFile::Single { limit_bytes, .. }) => limit_bytes,
                            _ => 0,
                        },
                        _ => 0,
                    })
                    .collect();
                let ctx =
                    format!("env={env:?} fixed={fixed:?} named={named:?} -> {got:?} {msgs:?}");
                if let Some(min_file) = file_limits.iter().copied().min() {
                    // A file exists: never pass-through, never above any file, env only lowers.
                    let want = env_ok.map_or(min_file, |e| e.min(min_file));
                    assert_eq!(got, Some(want), "{ctx}");
                    let invalid = present
                        .iter()
                        .any(|r| !matches!(r, FileRead::Text(t) if parse_limit_file(t).is_ok()));
                    if invalid {
                        assert_eq!(got, Some(0), "an invalid file fails closed: {ctx}");
                        assert!(msgs.iter().any(|m| m.contains("failing closed")), "{ctx}");
                    }
                    if env_ok.is_some_and(|e| e > min_file) {
                        assert!(msgs.iter().any(|m| m.contains("can only lower")), "{ctx}");
                    }
                } else {
                    assert_eq!(got, env_ok, "no file: the environment decides: {ctx}");
                }
                if env_bad {
                    assert!(
                        msgs.iter().any(|m| m.contains(env::VRAM_LIMIT_BYTES)),
                        "{ctx}"
                    );
                }
                if !env_bad
                    && present
                        .iter()
                        .all(|r| matches!(r, FileRead::Text(t) if parse_limit_file(t).is_ok()))
                    && !env_ok.is_some_and(|e| file_limits.iter().any(|f| e > *f))
                {
                    assert!(msgs.is_empty(), "nothing to say: {ctx}");
                }
            }
        }
    }
    assert_eq!(cases, 6 * 6 * 6);
}

/// What one file grants GPU `d`, read independently of the rule's code: an unreadable or
/// invalid file nothing, a single-form file its limit whatever the GPU, a per-GPU file the
/// GPU's entry or nothing.
fn file_grants(read: &FileRead, d: &str) -> u64 {
    match read {
        FileRead::Text(t) => match parse_limit_file(t) {
            Ok(LimitFile::Single { limit_bytes, .. }) => limit_bytes,
            Ok(LimitFile::PerGpu(g)) => g.get(d).unwrap_or(0),
            Err(_) => 0,
        },
        _ => 0,
    }
}

/// Every combination of both environment variables and two limit files of every form, checked
/// GPU by GPU against the rule written out per device.
#[test]
fn per_gpu_limit_resolution_is_exhaustively_the_rule() {
    const DEVICES: [&str; 3] = ["GPU-a", "GPU-b", "GPU-c"];
    let singles: [Option<&str>; 5] = [None, Some(""), Some("50Mi"), Some("300Mi"), Some("lots")];
    let pers: [Option<&str>; 6] = [
        None,
        Some(" "),
        Some("GPU-a:60Mi"),
        Some("GPU-a:400Mi,GPU-b:20Mi"),
        Some("GPU-c:10Mi"),
        Some("GPU-a=5"),
    ];
    let reads = || {
        vec![
            None,
            Some(FileRead::Missing),
            Some(FileRead::Text(limit_file_content(100 * MIB, "GPU-a"))),
            Some(FileRead::Text("limit=209715200\n".into())),
            Some(FileRead::Text(
                limits_file_content(&[("GPU-a", 100 * MIB), ("GPU-b", 200 * MIB)]).unwrap(),
            )),
            Some(FileRead::Text(
                limits_file_content(&[("GPU-b", 150 * MIB), ("GPU-c", 30 * MIB)]).unwrap(),
            )),
            Some(FileRead::Text("limits=GPU-a:1,GPU-a:2\n".into())),
            Some(FileRead::Error("permission denied".into())),
        ]
    };
    let mut cases = 0;
    for s_env in singles {
        for p_env in pers {
            for fixed in reads() {
                for named in reads() {
                    cases += 1;
                    let files: Vec<(String, FileRead)> =
                        [("/fixed", fixed.clone()), ("/named", named.clone())]
                            .into_iter()
                            .filter_map(|(p, r)| r.map(|r| (p.to_owned(), r)))
                            .collect();
                    let mut msgs = Vec::new();
                    let resolved = resolve_limits(
                        LimitEnv {
                            limit_bytes: s_env,
                            limits: p_env,
                        },
                        &files,
                        &mut msgs,
                    );
                    let got = &resolved.limits;
                    let ctx = format!(
                        "single={s_env:?} per={p_env:?} fixed={fixed:?} named={named:?} -> {got:?} {msgs:?}"
                    );
                    check_case(s_env, p_env, &files, got, &msgs, &DEVICES, &ctx);
                }
            }
        }
    }
    assert_eq!(cases, 5 * 6 * 8 * 8);
}

fn check_case(
    s_env: Option<&str>,
    p_env: Option<&str>,
    files: &[(String, FileRead)],
    got: &Limits,
    msgs: &[String],
    devices: &[&str],
    ctx: &str,
) {
    let s_ok = s_env.and_then(|e| crate::parse_bytes(e.trim()).ok());
    let s_bad = s_env.is_some_and(|e| !e.trim().is_empty() && s_ok.is_none());
    let p_ok = p_env.and_then(|e| GpuLimits::parse_env(e).ok());
    let p_bad = p_env.is_some_and(|e| !e.trim().is_empty() && p_ok.is_none());
    let present: Vec<&FileRead> = files
        .iter()
        .map(|(_, r)| r)
        .filter(|r| **r != FileRead::Missing)
        .collect();
    let parsed: Vec<Option<LimitFile>> = present
        .iter()
        .map(|r| match r {
            FileRead::Text(t) => parse_limit_file(t).ok(),
            _ => None,
        })
        .collect();
    let invalid = parsed.iter().any(Option::is_none);
    let any_single = parsed
        .iter()
        .any(|p| matches!(p, Some(LimitFile::Single { .. })));
    let any_per = parsed
        .iter()
        .any(|p| matches!(p, Some(LimitFile::PerGpu(_))));
    let fail_closed = invalid || (any_single && any_per);
    let file_gpu = parsed
        .iter()
        .find_map(|p| match p {
            Some(LimitFile::Single { gpu_uuid, .. }) if !gpu_uuid.is_empty() => {
                Some(gpu_uuid.clone())
            }
            _ => None,
        })
        .unwrap_or_default();
    let per_gpu_files: Vec<GpuLimits> = parsed
        .iter()
        .filter_map(|p| match p {
            Some(LimitFile::PerGpu(g)) => Some(g.clone()),
            _ => None,
        })
        .collect();
    let listed_everywhere =
        |d: &str| !per_gpu_files.is_empty() && per_gpu_files.iter().all(|g| g.contains(d));

    for d in devices {
        let want: Option<u64> = if present.is_empty() {
            // No file: the environment alone.
            match (s_ok, &p_ok) {
                (None, None) => None,
                (Some(s), None) => Some(s),
                (s, Some(p)) => Some(p.get(d).map_or(0, |v| s.map_or(v, |s| v.min(s)))),
            }
        } else if fail_closed {
            Some(0)
        } else {
            let from_files = present.iter().map(|r| file_grants(r, d)).min().unwrap_or(0);
            let mut v = from_files;
            if let Some(s) = s_ok {
                v = v.min(s);
            }
            if let Some(p) = &p_ok {
                let key = if any_single { file_gpu.as_str() } else { d };
                if !key.is_empty()
                    && let Some(e) = p.get(key)
                {
                    v = v.min(e);
                }
            }
            Some(v)
        };
        assert_eq!(got.for_gpu(d), want, "GPU {d}: {ctx}");
        if any_per && !fail_closed && !listed_everywhere(d) {
            assert_eq!(got.for_gpu(d), Some(0), "not in every file: refused: {ctx}");
        }
    }
    // The form: one account exactly when the inputs give one limit for the container.
    let intersection = per_gpu_files
        .first()
        .is_some_and(|f| f.iter().any(|(u, _)| listed_everywhere(u)));
    let want_form = if present.is_empty() {
        match (s_ok, &p_ok) {
            (_, Some(_)) => "per-GPU",
            (Some(_), None) => "single",
            (None, None) => "unlimited",
        }
    } else if !fail_closed && any_per && intersection {
        "per-GPU"
    } else {
        "single"
    };
    let form = match got {
        Limits::Unlimited => "unlimited",
        Limits::Single(_) => "single",
        Limits::PerGpu(_) => "per-GPU",
    };
    assert_eq!(form, want_form, "{ctx}");
    if invalid {
        assert!(msgs.iter().any(|m| m.contains("failing closed")), "{ctx}");
    }
    if any_single && any_per && !invalid {
        assert!(msgs.iter().any(|m| m.contains("different forms")), "{ctx}");
    }
    if s_bad {
        assert!(
            msgs.iter().any(|m| m.contains(env::VRAM_LIMIT_BYTES)),
            "{ctx}"
        );
    }
    if p_bad {
        assert!(msgs.iter().any(|m| m.contains(env::VRAM_LIMITS)), "{ctx}");
    }
    // A raise attempt against a clean file of one form is always reported; with valid,
    // agreeing inputs and nothing raised or unmatched there is nothing to say.
    let quiet = if present.is_empty() {
        !s_bad && !p_bad
    } else if fail_closed {
        false
    } else if any_single {
        let file = present
            .iter()
            .map(|r| file_grants(r, ""))
            .min()
            .unwrap_or(0);
        let matched = p_ok
            .as_ref()
            .and_then(|p| p.get(&file_gpu).filter(|_| !file_gpu.is_empty()));
        let raised = s_ok.is_some_and(|s| s > file) || matched.is_some_and(|e| e > file);
        if raised {
            assert!(msgs.iter().any(|m| m.contains("can only lower")), "{ctx}");
        }
        !s_bad && !p_bad && !raised && (p_ok.is_none() || matched.is_some())
    } else {
        let listed: Vec<(&str, u64)> = devices
            .iter()
            .filter(|d| listed_everywhere(d))
            .map(|d| {
                (
                    *d,
                    present.iter().map(|r| file_grants(r, d)).min().unwrap_or(0),
                )
            })
            .collect();
        // The grant: the GPUs every file lists, each at its lowest limit. A single value equal
        // to their sum is what the plugin gives a spanning container: it raises nothing.
        let grant: Vec<u64> = per_gpu_files
            .first()
            .map(|f| {
                f.iter()
                    .filter(|(u, _)| listed_everywhere(u))
                    .map(|(u, _)| present.iter().map(|r| file_grants(r, u)).min().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default();
        let grant_total = grant.iter().fold(0u64, |sum, b| sum.saturating_add(*b));
        let plugins_sum = grant.len() > 1 && s_ok == Some(grant_total);
        let raised = listed.iter().any(|(d, f)| {
            (s_ok.is_some_and(|s| s > *f) && !plugins_sum)
                || p_ok.as_ref().and_then(|p| p.get(d)).is_some_and(|e| e > *f)
        });
        if raised {
            assert!(msgs.iter().any(|m| m.contains("can only lower")), "{ctx}");
        }
        let agree = per_gpu_files.windows(2).all(|w| same_gpus(&w[0], &w[1]));
        let env_matched = p_ok
            .as_ref()
            .is_none_or(|p| p.iter().all(|(u, _)| listed_everywhere(u)));
        !s_bad && !p_bad && !raised && agree && env_matched
    };
    if quiet {
        assert!(msgs.is_empty(), "nothing to say: {ctx}");
    }
}

fn same_gpus(a: &GpuLimits, b: &GpuLimits) -> bool {
    a.len() == b.len() && a.iter().all(|(u, _)| b.contains(u))
}

#[test]
fn per_gpu_rule_cases_spelled_out() {
    let per = |pairs: &[(&str, u64)]| FileRead::Text(limits_file_content(pairs).unwrap());
    let run = |single: Option<&str>, limits: Option<&str>, files: Vec<FileRead>| {
        let files: Vec<(String, FileRead)> = files
            .into_iter()
            .enumerate()
            .map(|(i, r)| (format!("/f{i}"), r))
            .collect();
        let mut msgs = Vec::new();
        let r = resolve_limits(
            LimitEnv {
                limit_bytes: single,
                limits,
            },
            &files,
            &mut msgs,
        );
        (r.limits, msgs)
    };
    let two = || per(&[("GPU-a", 1 << 30), ("GPU-b", 2 << 30)]);
    // The file alone.
    let (l, m) = run(None, None, vec![two()]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 2 << 30)]))
    );
    assert!(m.is_empty(), "{m:?}");
    // The environment lowers one GPU only.
    let (l, m) = run(None, Some("GPU-b:512Mi"), vec![two()]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 512 << 20)]))
    );
    assert!(m.is_empty(), "{m:?}");
    // ...cannot raise one, nor add a GPU.
    let (l, m) = run(None, Some("GPU-a:4Gi,GPU-z:1Gi"), vec![two()]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 2 << 30)]))
    );
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(
        m[0].contains("GPU-a") && m[0].contains("can only lower"),
        "{m:?}"
    );
    assert!(
        m[1].contains("GPU-z") && m[1].contains("does not list"),
        "{m:?}"
    );
    // A single env limit applies to every GPU.
    let (l, m) = run(Some("1536Mi"), None, vec![two()]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 1536 << 20)]))
    );
    assert_eq!(m.len(), 1, "above GPU-a's limit: {m:?}");
    assert!(m[0].contains("GPU-a") && m[0].contains("can only lower"));
    // Two per-GPU files: the GPUs both list, the smaller limit each.
    let (l, m) = run(
        None,
        None,
        vec![two(), per(&[("GPU-b", 1 << 30), ("GPU-c", 1 << 30)])],
    );
    assert_eq!(l, Limits::PerGpu(gpus(&[("GPU-b", 1 << 30)])));
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|m| m.contains("refused")));
    // ...none in common: everything refused.
    let (l, _) = run(
        None,
        None,
        vec![
            per(&[("GPU-a", 1), ("GPU-x", 1)]),
            per(&[("GPU-b", 1), ("GPU-y", 1)]),
        ],
    );
    assert_eq!(l, Limits::Single(0));
    // Both forms: fail closed.
    let (l, m) = run(None, None, vec![file(5), two()]);
    assert_eq!(l, Limits::Single(0));
    assert!(m[0].contains("different forms") && m[0].contains("failing closed"));
    // A single-form file is lowered by its GPU's entry only.
    let (l, m) = run(None, Some("GPU-f:1Mi,GPU-a:1"), vec![file(100 * MIB)]);
    assert_eq!(l, Limits::Single(MIB));
    assert!(m.is_empty(), "{m:?}");
    let (l, m) = run(None, Some("GPU-a:1"), vec![file(100 * MIB)]);
    assert_eq!(l, Limits::Single(100 * MIB));
    assert!(
        m[0].contains("no entry for the limit file's GPU GPU-f"),
        "{m:?}"
    );
    let (l, m) = run(
        None,
        Some("GPU-a:1"),
        vec![FileRead::Text("limit=100\n".into())],
    );
    assert_eq!(l, Limits::Single(100));
    assert!(m[0].contains("names no GPU"), "{m:?}");
    // No file: the environment alone; both variables: per-GPU, capped by the single one.
    let (l, m) = run(None, Some("GPU-a:1Gi,GPU-b:3Gi"), vec![]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 3 << 30)]))
    );
    assert!(m.is_empty());
    let (l, _) = run(Some("2Gi"), Some("GPU-a:1Gi,GPU-b:3Gi"), vec![]);
    assert_eq!(
        l,
        Limits::PerGpu(gpus(&[("GPU-a", 1 << 30), ("GPU-b", 2 << 30)]))
    );
    let (l, m) = run(None, Some("GPU-a:1Gi,GPU-a:2Gi"), vec![]);
    assert_eq!(l, Limits::Unlimited);
    assert!(
        m[0].contains(env::VRAM_LIMITS)
            && m[0].contains("listed twice")
            && m[0].contains("NOT enforced"),
        "{m:?}"
    );
    let (l, m) = run(Some("1Gi"), Some("nonsense"), vec![]);
    assert_eq!(l, Limits::Single(1 << 30));
    assert!(
        m[0].contains(env::VRAM_LIMITS) && m[0].contains("ignored"),
        "{m:?}"
    );
}

#[test]
fn the_fixed_path_is_always_read_and_the_named_one_once() {
    assert_eq!(
        limit_file_paths(None),
        vec![LIMIT_FILE_CONTAINER_PATH.to_owned()]
    );
    assert_eq!(
        limit_file_paths(Some("  ")),
        vec![LIMIT_FILE_CONTAINER_PATH.to_owned()]
    );
    assert_eq!(
        limit_file_paths(Some(LIMIT_FILE_CONTAINER_PATH)),
        vec![LIMIT_FILE_CONTAINER_PATH.to_owned()]
    );
    assert_eq!(
        limit_file_paths(Some("/elsewhere")),
        vec![
            LIMIT_FILE_CONTAINER_PATH.to_owned(),
            "/elsewhere".to_owned()
        ]
    );
}

#[test]
fn io_outcomes_map_to_file_reads() {
    use std::io::{Error, ErrorKind};
    assert_eq!(
        FileRead::from_io(Ok("limit=1".into())),
        FileRead::Text("limit=1".into())
    );
    assert_eq!(
        FileRead::from_io(Err(Error::from(ErrorKind::NotFound))),
        FileRead::Missing
    );
    assert!(matches!(
        FileRead::from_io(Err(Error::from(ErrorKind::PermissionDenied))),
        FileRead::Error(_)
    ));
}

fn uuid_strategy() -> impl Strategy<Value = String> {
    "GPU-[a-f0-9]{1,8}"
}

proptest! {
    #[test]
    fn limit_file_parses_what_it_writes(limit in any::<u64>(), uuid in "[A-Za-z0-9-]{0,60}") {
        let parsed = parse_limit_file(&limit_file_content(limit, &uuid)).unwrap();
        prop_assert_eq!(parsed, single(limit, &uuid));
    }

    #[test]
    fn per_gpu_limit_file_parses_what_it_writes(
        entries in proptest::collection::btree_map(uuid_strategy(), any::<u64>(), 1..8)
    ) {
        let pairs: Vec<(String, u64)> = entries.into_iter().collect();
        let text = limits_file_content(&pairs).unwrap();
        let want = if pairs.len() == 1 {
            single(pairs[0].1, &pairs[0].0)
        } else {
            LimitFile::PerGpu(GpuLimits::new(pairs.iter().map(|(u, b)| (u.as_str(), *b))).unwrap())
        };
        prop_assert_eq!(parse_limit_file(&text).unwrap(), want);
        let env_form = GpuLimits::new(pairs.iter().map(|(u, b)| (u.as_str(), *b))).unwrap();
        prop_assert_eq!(GpuLimits::parse_env(&env_form.to_string()).unwrap(), env_form);
    }

    #[test]
    fn limit_file_garbage_never_panics(text in "\\PC{0,200}") {
        let _ = parse_limit_file(&text);
        let _ = GpuLimits::parse(&text);
        let _ = GpuLimits::parse_env(&text);
    }

    #[test]
    fn per_gpu_garbage_never_panics(text in "(limits=)?[A-Za-z0-9:, =\\-]{0,80}") {
        let _ = parse_limit_file(&text);
        let mut msgs = Vec::new();
        let _ = resolve_limits(LimitEnv { limit_bytes: None, limits: Some(&text) }, &[], &mut msgs);
    }

    #[test]
    fn environment_never_raises_a_file_limit(file_limit in any::<u64>(), env in any::<u64>()) {
        let (got, _) = resolve_single(Some(&env.to_string()), &[("/f".into(), file(file_limit))]);
        prop_assert_eq!(got, Limits::Single(file_limit.min(env)));
    }

    /// Per GPU: whatever both variables say, no GPU ends above what the file gave it, a GPU the
    /// file does not list gets nothing, and a value below the file's is what holds.
    #[test]
    fn environment_never_raises_a_per_gpu_limit(
        file_entries in proptest::collection::btree_map(uuid_strategy(), any::<u64>(), 2..6),
        env_entries in proptest::collection::btree_map(uuid_strategy(), any::<u64>(), 1..6),
        single_env in proptest::option::of(any::<u64>()),
        probe in uuid_strategy(),
    ) {
        let file_gpus = GpuLimits::new(file_entries.iter().map(|(u, b)| (u.as_str(), *b))).unwrap();
        let env_gpus = GpuLimits::new(env_entries.iter().map(|(u, b)| (u.as_str(), *b))).unwrap();
        let text = gpu_limits_file_content(&file_gpus);
        let env_text = env_gpus.to_string();
        let single_text = single_env.map(|s| s.to_string());
        let mut msgs = Vec::new();
        let got = resolve_limits(
            LimitEnv { limit_bytes: single_text.as_deref(), limits: Some(&env_text) },
            &[("/f".into(), FileRead::Text(text))],
            &mut msgs,
        ).limits;
        for uuid in file_entries.keys().chain(env_entries.keys()).chain(std::iter::once(&probe)) {
            let file_value = file_gpus.get(uuid).unwrap_or(0);
            let mut want = file_value;
            if let Some(s) = single_env { want = want.min(s); }
            if file_gpus.contains(uuid) && let Some(e) = env_gpus.get(uuid) { want = want.min(e); }
            prop_assert_eq!(got.for_gpu(uuid), Some(want), "{}", uuid);
            prop_assert!(got.for_gpu(uuid).unwrap_or(u64::MAX) <= file_value);
        }
    }
}

#[test]
fn under_the_plugins_limit_file_the_account_is_the_mounted_directory() {
    let fixed = |read: FileRead| vec![(LIMIT_FILE_CONTAINER_PATH.to_string(), read)];
    for read in [file(MIB), FileRead::Error("permission denied".into())] {
        for env_dir in [None, Some(""), Some(ACCOUNTING_CONTAINER_DIR)] {
            let got = account_dir(&fixed(read.clone()), env_dir);
            assert_eq!(
                got.dir.as_deref(),
                Some(Path::new(ACCOUNTING_CONTAINER_DIR)),
                "{env_dir:?}"
            );
            assert!(got.required);
            assert_eq!(got.note, None, "{env_dir:?}");
        }
        let repointed = account_dir(&fixed(read), Some("/tmp/mine"));
        assert_eq!(
            repointed.dir.as_deref(),
            Some(Path::new(ACCOUNTING_CONTAINER_DIR))
        );
        assert!(
            repointed
                .note
                .is_some_and(|n| n.contains("/tmp/mine") && n.contains(env::ACCOUNTING_DIR))
        );
    }
    // No plugin file (missing, or only a file the environment names): the variable decides.
    let named = vec![
        (LIMIT_FILE_CONTAINER_PATH.to_string(), FileRead::Missing),
        ("/named".to_string(), file(MIB)),
    ];
    let got = account_dir(&named, Some(" /tmp/mine "));
    assert_eq!(
        got,
        AccountDir {
            dir: Some("/tmp/mine".into()),
            required: false,
            note: None
        }
    );
    assert_eq!(account_dir(&named, None).dir, None);
}
