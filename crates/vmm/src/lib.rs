//! VMM (stub).
