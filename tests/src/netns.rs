//! Network namespaces for the end-to-end tests.
