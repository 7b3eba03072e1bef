//! Shared helpers for the workspace integration tests live in the test files for now.
