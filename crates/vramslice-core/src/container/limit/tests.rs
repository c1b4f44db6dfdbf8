use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn file(limit: u64) -> FileRead {
    FileRead::Text(limit_file_content(limit, "GPU-f"))
}

#[test]
fn limit_file_round_trips() {
    let text = limit_file_content(3 << 30, "GPU-b");
    assert_eq!(text, "limit=3221225472\ngpu=GPU-b\n");
    assert_eq!(
        parse_limit_file(&text),
        Ok(LimitFile {
            limit_bytes: 3 << 30,
            gpu_uuid: "GPU-b".into()
        })
    );
    assert_eq!(
        parse_limit_file("# written by vramslice\n\n limit = 5 \n"),
        Ok(LimitFile {
            limit_bytes: 5,
            gpu_uuid: String::new()
        })
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

/// Every environment value against every kind of file, for the fixed and the named path.
#[test]
fn limit_resolution_is_exhaustively_the_rule() {
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
                let mut msgs = Vec::new();
                let got = resolve_limit(env, &files, &mut msgs).limit;
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
                        FileRead::Text(t) => parse_limit_file(t).map_or(0, |f| f.limit_bytes),
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

proptest! {
    #[test]
    fn limit_file_parses_what_it_writes(limit in any::<u64>(), uuid in "[A-Za-z0-9-]{0,60}") {
        let parsed = parse_limit_file(&limit_file_content(limit, &uuid)).unwrap();
        prop_assert_eq!(parsed.limit_bytes, limit);
        prop_assert_eq!(parsed.gpu_uuid, uuid);
    }

    #[test]
    fn limit_file_garbage_never_panics(text in "\\PC{0,200}") {
        let _ = parse_limit_file(&text);
    }

    #[test]
    fn environment_never_raises_a_file_limit(file_limit in any::<u64>(), env in any::<u64>()) {
        let mut msgs = Vec::new();
        let got = resolve_limit(Some(&env.to_string()), &[("/f".into(), file(file_limit))], &mut msgs).limit;
        prop_assert_eq!(got, Some(file_limit.min(env)));
    }
}
