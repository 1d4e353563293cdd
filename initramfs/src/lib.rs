//! Placeholder: filled by the initramfs work.
