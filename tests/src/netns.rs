//! Network namespaces for tests (filled by the networking work).
