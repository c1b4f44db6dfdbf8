//! The container seam: what holds inside a container that got VRAM. Its limit, from the read-only
//! limit file and the environment ([`limit`]), and the layout of the accounting file its
//! processes share with the guard ([`accounting`]).

pub mod accounting;
pub mod limit;
