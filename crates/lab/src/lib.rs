//! Nested lab (stub).
