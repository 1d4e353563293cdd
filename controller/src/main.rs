//! The Controller daemon. Its work (device records, image store, image
//! distribution, jobs, admin API) lands with the Controller issue; for now
//! it only says so, so that the workspace layout is the one we keep.

fn main() {
    eprintln!(
        "shoal-controller {}: not built yet (see the Controller issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
