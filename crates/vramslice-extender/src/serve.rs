//! Serving (placeholder).
