use super::*;
use serde_json::json;

const GIB: u64 = 1 << 30;

fn slice(node: &str, capacities: &[u64]) -> ResourceSlice {
    let devices: Vec<_> = capacities
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({ "name": format!("gpu-{i}"), "allowMultipleAllocations": true,
                "attributes": { "uuid": { "string": format!("GPU-{node}-{i}") } },
                "capacity": { "memory": { "value": c.to_string() } } })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": { "name": format!("{node}-vramslice.io") },
        "spec": { "driver": "vramslice.io", "nodeName": node,
            "pool": { "name": node, "generation": 1, "resourceSliceCount": 1 }, "devices": devices }
    }))
    .expect("slice")
}

fn claim(name: &str, count: u64, memory: &str, allocated: &[(&str, &str, &str)]) -> ResourceClaim {
    let results: Vec<_> = allocated
        .iter()
        .map(|(pool, device, mem)| {
            json!({ "request": "vram", "driver": "vramslice.io", "pool": pool, "device": device,
                "consumedCapacity": { "memory": mem } })
        })
        .collect();
    let status = if results.is_empty() {
        json!({})
    } else {
        json!({ "allocation": { "devices": { "results": results } },
            "reservedFor": [{ "resource": "pods", "name": format!("{name}-pod"), "uid": format!("uid-{name}") }] })
    };
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": "ml" },
        "spec": { "devices": { "requests": [{ "name": "vram", "exactly": {
            "deviceClassName": "vram.vramslice.io", "count": count,
            "capacity": { "requests": { "memory": memory } } } }] } },
        "status": status
    }))
    .expect("claim")
}

/// What `explain` holds for a pod before its claims are looked at.
fn no_vram_yet(pod: &str) -> crate::explain::Explanation {
    crate::explain::Explanation {
        pod: pod.into(),
        state: crate::explain::PodState::NoVram,
        resource: None,
        units: None,
        request_bytes: None,
        scheduler_name: "default-scheduler".into(),
        largest_gpu_bytes: None,
        nodes: Vec::new(),
        events: Vec::new(),
        notes: Vec::new(),
    }
}

#[test]
fn room_is_published_capacity_minus_allocated_claims() {
    let slices = [slice("node-a", &[63 * GIB, 80 * GIB])];
    let claims = [
        claim("a", 1, "20Gi", &[("node-a", "gpu-0", "20Gi")]),
        claim("b", 1, "10Gi", &[("node-a", "gpu-0", "10Gi")]),
    ];
    let rooms = device_rooms(&slices, &claims);
    assert_eq!(rooms.len(), 2);
    assert_eq!(
        (rooms[0].device.as_str(), rooms[0].free()),
        ("gpu-0", 33 * GIB)
    );
    assert_eq!(rooms[0].gpu_uuid.as_deref(), Some("GPU-node-a-0"));
    assert_eq!(rooms[1].free(), 80 * GIB);
}

#[test]
fn a_pending_claim_is_explained_per_node() {
    let slices = [
        slice("node-a", &[40 * GIB, 30 * GIB]),
        slice("node-b", &[80 * GIB, 80 * GIB]),
    ];
    let rooms = device_rooms(
        &slices,
        &[claim("x", 1, "70Gi", &[("node-b", "gpu-0", "70Gi")])],
    );
    let two = claim_asks(&claim("tp2", 2, "35Gi", &[]));
    assert_eq!(
        two,
        [ClaimAsk {
            claim: "ml/tp2".into(),
            request: "vram".into(),
            options: vec![DeviceAsk {
                count: 2,
                bytes_each: Some(35 * GIB),
                selectors: Vec::new(),
            }],
            other_classes: Vec::new(),
        }]
    );
    let verdicts = dra_verdicts(&two, &rooms);
    assert!(!verdicts[0].fits);
    assert_eq!(
        verdicts[0].reason.as_deref(),
        Some(
            "claim ml/tp2 needs 2 device(s) with 35 GiB each; node-a has gpu-1 30 GiB free, gpu-0 40 GiB free"
        )
    );
    // node-b: gpu-0 has 10 GiB left, gpu-1 80: only one device fits.
    assert!(!verdicts[1].fits, "{verdicts:?}");
    let one = claim_asks(&claim("one", 1, "35Gi", &[]));
    let verdicts = dra_verdicts(&one, &rooms);
    assert!(verdicts.iter().all(|v| v.fits), "{verdicts:?}");
}

#[test]
fn claims_show_pods_gpus_grant_and_measured_use() {
    let slices = [slice("node-a", &[80 * GIB, 80 * GIB])];
    let claims = [
        claim(
            "tp2",
            2,
            "20Gi",
            &[("node-a", "gpu-0", "20Gi"), ("node-a", "gpu-1", "20Gi")],
        ),
        claim("waiting", 1, "6Gi", &[]),
    ];
    let rooms = device_rooms(&slices, &claims);
    let gpunode: GpuNode = serde_json::from_value(json!({
        "apiVersion": "vramslice.io/v1alpha1", "kind": "GpuNode", "metadata": { "name": "node-a" },
        "spec": { "nodeName": "node-a" },
        "status": { "observedAt": "2026-12-06T10:00:00Z", "unit": "1Gi", "resourceName": "vramslice.io/vram-gib", "summary": { "gpus": 2, "total": "160 GiB", "liveFree": "0", "allocated": "40 GiB", "healthy": "2/2" }, "gpus": [
            { "index": 0, "uuid": "GPU-node-a-0", "model": "H100", "totalBytes": 85899345920u64, "usedBytes": 0,
              "freeBytes": 0, "units": 80, "allocatedUnits": 20, "healthy": true,
              "pods": [{ "namespace": "ml", "name": "tp2-pod", "uid": "uid-tp2", "allocatedUnits": 20,
                         "limitBytes": 21474836480u64, "usedBytes": 3221225472u64 }] },
            { "index": 1, "uuid": "GPU-node-a-1", "model": "H100", "totalBytes": 85899345920u64, "usedBytes": 0,
              "freeBytes": 0, "units": 80, "allocatedUnits": 20, "healthy": true,
              "pods": [{ "namespace": "ml", "name": "tp2-pod", "uid": "uid-tp2", "allocatedUnits": 20,
                         "limitBytes": 21474836480u64, "usedBytes": 2147483648u64 }] } ] }
    }))
    .expect("gpunode");
    let rows = claim_rows(&claims, &rooms, &[gpunode]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].claim, "tp2");
    assert_eq!(rows[0].pods, ["tp2-pod"]);
    assert_eq!(
        rows[0].gpus,
        ["gpu-0 (GPU-node-a-0)", "gpu-1 (GPU-node-a-1)"]
    );
    assert_eq!(rows[0].granted_bytes, 40 * GIB);
    assert_eq!(rows[0].used_bytes, Some(5 * GIB));
    assert_eq!(
        (rows[1].claim.as_str(), rows[1].state.as_str()),
        ("waiting", "pending")
    );
}

#[test]
fn a_pending_pod_with_claims_gets_each_nodes_device_room() {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "llm", "namespace": "ml" },
        "spec": { "containers": [{ "name": "c" }],
                  "resourceClaims": [{ "name": "vram", "resourceClaimTemplateName": "vram-6g" }] },
        "status": { "phase": "Pending",
                    "resourceClaimStatuses": [{ "name": "vram", "resourceClaimName": "llm-vram-x" }] }
    }))
    .expect("pod");
    let rooms = device_rooms(
        &[slice("node-a", &[4 * GIB]), slice("node-b", &[80 * GIB])],
        &[],
    );
    let mut e = no_vram_yet("ml/llm");
    explain_claims(&mut e, &pod, &[claim("llm-vram-x", 1, "6Gi", &[])], &rooms);
    assert_eq!(e.state, crate::explain::PodState::Pending { fits_on: 1 });
    assert!(!e.nodes[0].fits);
    assert!(
        e.nodes[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("node-a has gpu-0 4 GiB free")),
        "{:?}",
        e.nodes[0]
    );
    assert!(e.nodes[1].fits);
    assert!(
        e.notes.iter().any(|n| n.starts_with("DRA mode")),
        "{:?}",
        e.notes
    );
}

#[test]
fn selectors_are_carried_and_explained_as_not_evaluated() {
    let mut with_selector = claim("picky", 1, "8Gi", &[]);
    let expr =
        r#"device.attributes["vramslice.io"].driverVersion.compareTo(semver("999.0.0")) >= 0"#;
    if let Some(r) = with_selector
        .spec
        .as_mut()
        .and_then(|s| s.devices.as_mut())
        .and_then(|d| d.requests.as_mut())
        .and_then(|r| r.first_mut())
        .and_then(|r| r.exactly.as_mut())
    {
        r.selectors = Some(vec![
            serde_json::from_value(json!({ "cel": { "expression": expr } })).expect("selector"),
        ]);
    }
    let asks = claim_asks(&with_selector);
    assert_eq!(asks[0].options[0].selectors, [expr.to_string()]);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "picky-pod", "namespace": "ml" },
        "spec": { "containers": [], "resourceClaims": [{ "name": "vram", "resourceClaimName": "picky" }] },
        "status": { "resourceClaimStatuses": [{ "name": "vram", "resourceClaimName": "picky" }] }
    }))
    .expect("pod");
    let rooms = device_rooms(&[slice("node-a", &[40 * GIB])], &[]);
    let mut out = no_vram_yet("ml/picky-pod");
    explain_claims(&mut out, &pod, &[with_selector], &rooms);
    assert!(
        out.nodes[0].fits,
        "room for 8 GiB on node-a: {:?}",
        out.nodes
    );
    let note = out
        .notes
        .iter()
        .find(|n| n.contains("selects devices by CEL"))
        .unwrap_or_else(|| panic!("no selector note in {:?}", out.notes));
    assert!(
        note.contains("claim ml/picky") && note.contains(expr),
        "{note}"
    );
}

#[test]
fn a_tainted_device_has_no_room_and_says_why() {
    let mut s = slice("node-a", &[80 * GIB, 10 * GIB]);
    if let Some(d) = s.spec.devices.as_mut().and_then(|d| d.first_mut()) {
        *d = serde_json::from_value(json!({ "name": "gpu-0", "allowMultipleAllocations": true,
            "attributes": { "uuid": { "string": "GPU-node-a-0" }, "healthy": { "bool": false },
                "unhealthyReason": { "string": "XID 79" } },
            "capacity": { "memory": { "value": (80 * GIB).to_string() } },
            "taints": [{ "key": "vramslice.io/unhealthy", "effect": "NoSchedule" }] }))
        .expect("device");
    }
    let rooms = device_rooms(&[s], &[]);
    assert_eq!(rooms[0].free(), 0);
    assert_eq!(
        rooms[0].taint.as_deref(),
        Some("vramslice.io/unhealthy (XID 79)")
    );
    let verdicts = dra_verdicts(&claim_asks(&claim("big", 1, "20Gi", &[])), &rooms);
    assert_eq!(
        verdicts[0].reason.as_deref(),
        Some(
            "claim ml/big needs 1 device(s) with 20 GiB each; node-a has gpu-0 tainted vramslice.io/unhealthy (XID 79), gpu-1 10 GiB free"
        )
    );
}

#[test]
fn claims_named_directly_count_and_claims_not_made_yet_are_said() {
    // The status lists only claims made from templates; a claim named in the spec is the pod's
    // too. No device has 40 GiB: the pod fits nowhere.
    let direct: Pod = serde_json::from_value(json!({
        "metadata": { "name": "p", "namespace": "ml" },
        "spec": { "containers": [], "resourceClaims": [{ "name": "vram", "resourceClaimName": "big" }] }
    }))
    .expect("pod");
    assert_eq!(pod_claim_names(&direct), (vec!["big".to_string()], 0));
    let rooms = device_rooms(&[slice("node-a", &[16 * GIB])], &[]);
    let mut out = no_vram_yet("ml/p");
    explain_claims(&mut out, &direct, &[claim("big", 1, "40Gi", &[])], &rooms);
    assert_eq!(
        out.state,
        crate::explain::PodState::Pending { fits_on: 0 },
        "{:?}",
        out.nodes
    );
    // Not created yet (named directly, or from a template the controller has not instantiated):
    // kube-scheduler waits for it, so no node fits now.
    let mut out = no_vram_yet("ml/p");
    explain_claims(&mut out, &direct, &[], &rooms);
    assert!(matches!(
        out.state,
        crate::explain::PodState::InvalidRequest { .. }
    ));
    let templated: Pod = serde_json::from_value(json!({
        "metadata": { "name": "t", "namespace": "ml" },
        "spec": { "containers": [], "resourceClaims": [
            { "name": "vram", "resourceClaimTemplateName": "vram-8g" },
            { "name": "other", "resourceClaimTemplateName": "x" }
        ] },
        "status": { "resourceClaimStatuses": [{ "name": "vram", "resourceClaimName": "t-vram-abc" }] }
    }))
    .expect("pod");
    assert_eq!(
        pod_claim_names(&templated),
        (vec!["t-vram-abc".to_string()], 1)
    );
    let mut out = no_vram_yet("ml/t");
    explain_claims(
        &mut out,
        &templated,
        &[claim("t-vram-abc", 1, "1Gi", &[])],
        &rooms,
    );
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("1 of the pod's claims does not exist yet")),
        "{:?}",
        out.notes
    );
}

#[test]
fn a_request_comes_to_what_the_device_policy_makes_of_it() {
    // 1 GiB steps from 1 GiB, default 1 GiB: no amount is 1 GiB, 1.5 GiB is 2 GiB.
    let mut s = slice("node-a", &[2 * GIB]);
    let policy = json!({ "default": GIB.to_string(),
        "validRange": { "min": GIB.to_string(), "step": GIB.to_string() } });
    let device = &mut s.spec.devices.as_mut().expect("devices")[0];
    device
        .capacity
        .as_mut()
        .and_then(|c| c.get_mut("memory"))
        .expect("memory")
        .request_policy = Some(serde_json::from_value(policy).expect("policy"));
    // 1.5 GiB already allocated: 512 MiB of room.
    let held = claim("held", 1, "1536Mi", &[("node-a", "gpu-0", "1536Mi")]);
    let rooms = device_rooms(&[s], &[held]);
    assert_eq!(rooms[0].consumes(None), GIB);
    assert_eq!(rooms[0].consumes(Some(GIB / 2)), GIB);
    assert_eq!(rooms[0].consumes(Some(3 * GIB / 2)), 2 * GIB);
    assert_eq!(rooms[0].consumes(Some(2 * GIB)), 2 * GIB);
    // A claim naming no memory takes the default (1 GiB), not 1 byte: it does not fit.
    let ask = ClaimAsk {
        claim: "ml/any".into(),
        request: "vram".into(),
        options: vec![DeviceAsk {
            count: 1,
            bytes_each: None,
            selectors: Vec::new(),
        }],
        other_classes: Vec::new(),
    };
    let verdicts = dra_verdicts(&[ask], &rooms);
    assert!(!verdicts[0].fits, "{verdicts:?}");
    assert!(
        verdicts[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("with 1 GiB each")),
        "{verdicts:?}"
    );
    // A device without a policy: an amount is itself, no amount the whole device.
    let plain = device_rooms(&[slice("node-b", &[4 * GIB])], &[]);
    assert_eq!(plain[0].consumes(Some(3 * GIB / 2)), 3 * GIB / 2);
    assert_eq!(plain[0].consumes(None), 4 * GIB);
}

#[test]
fn a_first_available_request_fits_where_one_of_its_vramslice_options_does() {
    // As docs/operations.md's `vram/large` example: 40 GiB if a GPU has it, else 20 GiB.
    let claim: ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": "flex", "namespace": "ml" },
        "spec": { "devices": { "requests": [{ "name": "vram", "firstAvailable": [
            { "name": "large", "deviceClassName": "vram.vramslice.io",
              "capacity": { "requests": { "memory": "40Gi" } } },
            { "name": "small", "deviceClassName": "vram.vramslice.io",
              "capacity": { "requests": { "memory": "20Gi" } } },
            { "name": "other", "deviceClassName": "gpu.example.com" }
        ] }] } }
    }))
    .expect("claim");
    let asks = claim_asks(&claim);
    assert_eq!(asks.len(), 1, "{asks:?}");
    assert_eq!(asks[0].options.len(), 2);
    assert_eq!(asks[0].other_classes, ["gpu.example.com"]);
    let rooms = device_rooms(
        &[slice("node-a", &[24 * GIB]), slice("node-b", &[16 * GIB])],
        &[],
    );
    let verdicts = dra_verdicts(&asks, &rooms);
    assert!(verdicts[0].fits, "20 GiB fits on node-a: {verdicts:?}");
    assert!(!verdicts[1].fits, "{verdicts:?}");
    let reason = verdicts[1].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("40 GiB each or 1 device(s) with 20 GiB each")
            && reason.contains("class gpu.example.com are not evaluated"),
        "{reason}"
    );
    // A pending claim made only of alternatives is listed by `claims`.
    let rows = claim_rows(std::slice::from_ref(&claim), &rooms, &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state, "pending");
}

#[test]
fn a_first_available_request_yields_its_first_option_when_a_later_request_needs_the_room() {
    // Request A takes 40 GiB if it can, else 20 GiB; request B needs 40 GiB. On GPUs with 45 and
    // 25 GiB of room, A at 40 GiB would leave B nothing: the scheduler gives A 20 GiB instead.
    let claim: ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": "pair", "namespace": "ml" },
        "spec": { "devices": { "requests": [
            { "name": "a", "firstAvailable": [
                { "name": "large", "deviceClassName": "vram.vramslice.io",
                  "capacity": { "requests": { "memory": "40Gi" } } },
                { "name": "small", "deviceClassName": "vram.vramslice.io",
                  "capacity": { "requests": { "memory": "20Gi" } } } ] },
            { "name": "b", "exactly": { "deviceClassName": "vram.vramslice.io",
                "capacity": { "requests": { "memory": "40Gi" } } } }
        ] } }
    }))
    .expect("claim");
    let rooms = device_rooms(&[slice("node-a", &[45 * GIB, 25 * GIB])], &[]);
    let verdicts = dra_verdicts(&claim_asks(&claim), &rooms);
    assert!(verdicts[0].fits, "{verdicts:?}");
    // With room for one 40 GiB request only, it does not fit, and the reason names request b.
    let tight = device_rooms(&[slice("node-a", &[45 * GIB, 15 * GIB])], &[]);
    let verdicts = dra_verdicts(&claim_asks(&claim), &tight);
    assert!(!verdicts[0].fits);
    assert!(
        verdicts[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("claim ml/pair needs 1 device(s) with 40 GiB each;")),
        "{verdicts:?}"
    );
}
