//! Exported CUDA graph entry points: graph memory nodes are charged when the driver maps them
//! (the policy: `crate::guard::graphs`).
//!
//! Instantiation reads the bytes of the graph's memory nodes per device (walking child graphs
//! too); a launch or upload asks the policy first, calls the driver, then lets the policy re-read
//! the device's graph memory pool; `cuDeviceGraphMemTrim` re-reads it too. An allocation made on
//! a capturing stream is a memory node, not memory: the allocation entry points pass it through
//! ([`capturing`]); a free captured on one frees when the graph runs ([`capture_graph`]).
#![allow(non_snake_case)]

use super::types::*;
use super::{after_success, boundary, current_device, guard, read_out, real_fn};
use crate::guard::{GraphNeeds, GraphPoolReading};
use std::ffi::{c_char, c_int};

/// Child graphs are walked this deep at most (real graphs nest a level or two).
const MAX_GRAPH_DEPTH: usize = 16;

/// Whether `stream` is capturing (an allocation on it becomes a graph memory node). `ptsz`: the
/// caller used a per-thread-default-stream entry point, so stream 0 means that stream.
pub(super) fn capturing(stream: Handle, ptsz: bool) -> bool {
    let Some(r) = super::real::real() else {
        return false;
    };
    let f = if ptsz {
        r.cuStreamIsCapturing_ptsz.or(r.cuStreamIsCapturing)
    } else {
        r.cuStreamIsCapturing
    };
    let Some(f) = f else { return false };
    let mut status: c_int = CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: the caller's stream handle and one out-pointer to a live local.
    let rc = unsafe { f(stream, &raw mut status) };
    rc == CUDA_SUCCESS && status != CU_STREAM_CAPTURE_STATUS_NONE
}

/// The graph `stream` is capturing into, if it is capturing (`cuStreamGetCaptureInfo_v3`, else
/// `_v2`; `ptsz` as for [`capturing`]).
pub(super) fn capture_graph(stream: Handle, ptsz: bool) -> Option<Handle> {
    let r = super::real::real()?;
    let mut status: c_int = CU_STREAM_CAPTURE_STATUS_NONE;
    let mut graph: Handle = std::ptr::null_mut();
    let (v3, v2) = if ptsz {
        (
            r.cuStreamGetCaptureInfo_v3_ptsz,
            r.cuStreamGetCaptureInfo_v2_ptsz,
        )
    } else {
        (r.cuStreamGetCaptureInfo_v3, r.cuStreamGetCaptureInfo_v2)
    };
    let (id, deps, edges, count) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    let rc = match (v3, v2) {
        // SAFETY: the caller's stream; status and graph are live locals; the optional out
        // parameters (id, dependencies, edge data, their count) are null, which the API allows.
        (Some(f), _) => unsafe {
            f(
                stream,
                &raw mut status,
                id,
                &raw mut graph,
                deps,
                edges,
                count,
            )
        },
        // SAFETY: as above, without the edge data.
        (None, Some(f)) => unsafe { f(stream, &raw mut status, id, &raw mut graph, deps, count) },
        (None, None) => return None,
    };
    let capturing = rc == CUDA_SUCCESS && status != CU_STREAM_CAPTURE_STATUS_NONE;
    (capturing && !graph.is_null()).then_some(graph)
}

/// What names `stream`'s capture between a captured free and `cuStreamEndCapture`: the handle;
/// for a per-thread default stream (`0` through a `_ptsz` entry point, or
/// `CU_STREAM_PER_THREAD`), which is each thread's own, the handle with the thread.
pub(super) fn capture_key(stream: Handle, ptsz: bool) -> u64 {
    let handle = stream as usize as u64;
    if (ptsz && handle == 0) || handle == CU_STREAM_PER_THREAD {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        (u64::from(tid.unsigned_abs()) << 32) | CU_STREAM_PER_THREAD
    } else {
        handle
    }
}

/// The graph memory pool of device `dev` (the `graph_pool` probe).
pub(super) fn graph_pool(dev: i32) -> Option<GraphPoolReading> {
    let f = super::real::real()?.cuDeviceGetGraphMemAttribute?;
    let read = |attr: c_int| {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t values written to `v`.
        (unsafe { f(dev, attr, (&raw mut v).cast()) } == CUDA_SUCCESS).then_some(v)
    };
    Some(GraphPoolReading {
        reserved: read(CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT)?,
        used: read(CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT)?,
    })
}

/// Trims device `dev`'s graph memory pool (the `graph_trim` probe).
pub(super) fn graph_trim(dev: i32) -> bool {
    let Some(f) = super::real::real().and_then(|r| r.cuDeviceGraphMemTrim) else {
        return false;
    };
    // SAFETY: a device ordinal by value.
    unsafe { f(dev) == CUDA_SUCCESS }
}

/// Bytes of `graph`'s memory nodes per device, child graphs included; `None` when the driver
/// cannot say (the graph is then re-read after each launch instead).
fn graph_needs(graph: Handle) -> Option<GraphNeeds> {
    let mut needs = GraphNeeds::new();
    walk(graph, 0, &mut needs)?;
    Some(needs)
}

fn walk(graph: Handle, depth: usize, needs: &mut GraphNeeds) -> Option<()> {
    if depth > MAX_GRAPH_DEPTH {
        return None;
    }
    let r = super::real::real()?;
    let (get_nodes, node_type, alloc_params) = (
        r.cuGraphGetNodes?,
        r.cuGraphNodeGetType?,
        r.cuGraphMemAllocNodeGetParams?,
    );
    let mut n: usize = 0;
    // SAFETY: a null node array asks for the count only.
    if unsafe { get_nodes(graph, std::ptr::null_mut(), &raw mut n) } != CUDA_SUCCESS {
        return None;
    }
    let mut nodes: Vec<Handle> = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` has room for `n` handles; the driver writes at most `n` and sets `n`.
    if n > 0 && unsafe { get_nodes(graph, nodes.as_mut_ptr(), &raw mut n) } != CUDA_SUCCESS {
        return None;
    }
    nodes.truncate(n);
    for node in nodes {
        let mut ty: c_int = -1;
        // SAFETY: a node handle the driver gave and one out-pointer to a live local.
        if unsafe { node_type(node, &raw mut ty) } != CUDA_SUCCESS {
            return None;
        }
        match ty {
            CU_GRAPH_NODE_TYPE_MEM_ALLOC => {
                let mut p = MemAllocNodeParams::zeroed();
                // SAFETY: `p` has the layout of CUDA_MEM_ALLOC_NODE_PARAMS (checked in types).
                if unsafe { alloc_params(node, &raw mut p) } != CUDA_SUCCESS {
                    return None;
                }
                if p.pool.location_type == CU_MEM_LOCATION_TYPE_DEVICE {
                    add_need(needs, p.pool.location_id, p.bytesize as u64);
                }
            }
            CU_GRAPH_NODE_TYPE_GRAPH => {
                let get_child = r.cuGraphChildGraphNodeGetGraph?;
                let mut child: Handle = std::ptr::null_mut();
                // SAFETY: a child graph node and one out-pointer to a live local.
                if unsafe { get_child(node, &raw mut child) } != CUDA_SUCCESS {
                    return None;
                }
                walk(child, depth + 1, needs)?;
            }
            _ => {}
        }
    }
    Some(())
}

fn add_need(needs: &mut GraphNeeds, dev: i32, bytes: u64) {
    match needs.iter_mut().find(|(d, _)| *d == dev) {
        Some((_, b)) => *b = b.saturating_add(bytes),
        None => needs.push((dev, bytes)),
    }
}

/// Instantiation: record the graph's memory nodes; one that also uploads is checked as a launch.
#[inline(always)]
fn instantiated(
    exec: *mut Handle,
    graph: Handle,
    uploads: bool,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(g) = guard() else { return call() };
    let needs = graph_needs(graph);
    let plan = match (uploads, &needs) {
        (true, Some(n)) => match g.graph_before_instantiate_upload(n) {
            Ok(plan) => Some(plan),
            // Logged once where it is decided (a device without a limit, or over the limit).
            Err(_) => return CUDA_ERROR_OUT_OF_MEMORY,
        },
        _ => None,
    };
    let rc = call();
    // SAFETY: exec is read only after the driver reported success.
    let made = (rc == CUDA_SUCCESS)
        .then(|| unsafe { read_out(exec) })
        .flatten();
    if let Some(e) = made {
        g.graph_instantiated(e as usize as u64, graph as usize as u64, needs, uploads);
    }
    if let Some(plan) = plan {
        g.graph_after_mapping(plan, made.is_some());
    }
    rc
}

/// A launch (`runs`) or upload: checked before, re-read after.
#[inline(always)]
fn mapped(exec: Handle, runs: bool, call: impl FnOnce() -> CUresult) -> CUresult {
    let Some(g) = guard() else { return call() };
    let exec = exec as usize as u64;
    let current = || current_device().ok();
    let planned = if runs {
        g.graph_before_launch(exec, current)
    } else {
        g.graph_before_upload(exec, current)
    };
    let plan = match planned {
        Ok(plan) => plan,
        // Logged once where it is decided (a device without a limit, or over the limit).
        Err(_) => return CUDA_ERROR_OUT_OF_MEMORY,
    };
    let rc = call();
    g.graph_after_mapping(plan, rc == CUDA_SUCCESS);
    rc
}

macro_rules! instantiate_legacy {
    ($name:ident) => {
        /// Interposed CUDA 11 instantiation (error node and log buffer).
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            exec: *mut Handle,
            graph: Handle,
            err_node: *mut Handle,
            log: *mut c_char,
            log_size: usize,
        ) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                instantiated(exec, graph, false, || unsafe {
                    f(exec, graph, err_node, log, log_size)
                })
            })
        }
    };
}
instantiate_legacy!(cuGraphInstantiate);
instantiate_legacy!(cuGraphInstantiate_v2);

/// Interposed `cuGraphInstantiateWithFlags`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut Handle,
    graph: Handle,
    flags: u64,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuGraphInstantiateWithFlags);
        // SAFETY: arguments forwarded unchanged.
        instantiated(exec, graph, false, || unsafe { f(exec, graph, flags) })
    })
}

macro_rules! instantiate_with_params {
    ($name:ident) => {
        /// Interposed instantiation with parameters (which may ask for an upload).
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            exec: *mut Handle,
            graph: Handle,
            params: *mut GraphInstantiateParams,
        ) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: params is null or points at the caller's CUDA_GRAPH_INSTANTIATE_PARAMS.
                let uploads = unsafe { params.as_ref() }
                    .is_some_and(|p| p.flags & CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD != 0);
                // SAFETY: arguments forwarded unchanged.
                instantiated(exec, graph, uploads, || unsafe { f(exec, graph, params) })
            })
        }
    };
}
instantiate_with_params!(cuGraphInstantiateWithParams);
instantiate_with_params!(cuGraphInstantiateWithParams_ptsz);

/// Interposed `cuGraphExecDestroy`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuGraphExecDestroy);
        // SAFETY: argument forwarded unchanged.
        let rc = unsafe { f(exec) };
        after_success(rc, |g| g.graph_destroyed(exec as usize as u64))
    })
}

macro_rules! launch_like {
    ($name:ident, $runs:literal, $what:literal) => {
        #[doc = concat!("Interposed `", stringify!($name), "`: ", $what, ".")]
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(exec: Handle, stream: Handle) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                mapped(exec, $runs, || unsafe { f(exec, stream) })
            })
        }
    };
}
launch_like!(
    cuGraphLaunch,
    true,
    "maps the graph's memory nodes, then runs it"
);
launch_like!(
    cuGraphLaunch_ptsz,
    true,
    "maps the graph's memory nodes, then runs it"
);
launch_like!(
    cuGraphUpload,
    false,
    "maps the graph's memory nodes ahead of a launch"
);
launch_like!(
    cuGraphUpload_ptsz,
    false,
    "maps the graph's memory nodes ahead of a launch"
);

macro_rules! end_capture {
    ($name:ident, $ptsz:literal) => {
        #[doc = concat!("Interposed `", stringify!($name), "`: frees captured on the stream move to the graph the capture made, or are forgotten when it made none (an invalidated capture: the driver destroys that graph itself, and a later graph may get its handle).")]
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(stream: Handle, graph: *mut Handle) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                let rc = unsafe { f(stream, graph) };
                // The capture is looked up by its stream, as recorded at its captured frees: an
                // invalidated capture's graph can no longer be asked for (the driver answers
                // only a live capture's).
                if let Some(g) = guard() {
                    let made = (rc == CUDA_SUCCESS)
                        // SAFETY: graph is read only after the driver reported success.
                        .then(|| unsafe { read_out(graph) })
                        .flatten()
                        .filter(|h| !h.is_null());
                    g.graph_capture_ended(capture_key(stream, $ptsz), made.map(|h| h as usize as u64));
                }
                rc
            })
        }
    };
}
end_capture!(cuStreamEndCapture, false);
end_capture!(cuStreamEndCapture_ptsz, true);

/// Interposed `cuGraphDestroy`: frees captured into the graph are forgotten.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(graph: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuGraphDestroy);
        // SAFETY: argument forwarded unchanged.
        let rc = unsafe { f(graph) };
        after_success(rc, |g| g.graph_source_destroyed(graph as usize as u64))
    })
}

/// Interposed `cuDeviceGraphMemTrim`: the device's charge follows its pool.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGraphMemTrim(dev: CUdevice) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuDeviceGraphMemTrim);
        // SAFETY: argument forwarded unchanged.
        let rc = unsafe { f(dev) };
        after_success(rc, |g| g.graph_trimmed(dev))
    })
}
