//! Layout of the per-container accounting file shared by the guard (writer), the device plugin
//! and the sidecar (readers). Owned by the guard work; see `vramslice-guard`.
