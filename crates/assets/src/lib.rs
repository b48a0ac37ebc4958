//! Guest assets (stub).
