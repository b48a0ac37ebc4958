//! Architecture-specific parts of the machine. cela runs x86_64 guests only.

pub mod x86_64;
