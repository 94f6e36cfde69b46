//! Placeholder; the scale bench lands next.
fn main() {}
