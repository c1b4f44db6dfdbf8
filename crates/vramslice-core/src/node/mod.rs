//! The node seam: what a GPU node's device plugin decides. The GPU sample every backend returns
//! ([`sample`]), the units a node advertises ([`inventory`]), what Allocate hands a container
//! ([`allocation`]), the report it publishes and when ([`publish`]), a pod's limit while a plain
//! init container runs ([`init_limit`]), the watchdog's verdicts ([`watchdog`]), which ended
//! allocations' files to remove ([`sweep`]), and how a process's cgroup names its pod
//! ([`cgroup`]); in DRA mode, the slice it publishes and the claims it prepares ([`dra`]).

pub mod allocation;
pub mod cgroup;
pub mod dra;
pub mod init_limit;
pub mod inventory;
pub mod publish;
pub mod sample;
pub mod sweep;
pub mod watchdog;
