//! Watches (placeholder).
