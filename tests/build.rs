//! Builds the guest components before the tests compile, so `cargo test`
//! needs no manual step, and tells the tests where the `.wasm` files are.

#[allow(dead_code)]
#[path = "../xtask/src/guests.rs"]
mod guests;

fn main() {
    let manifest_dir =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("tests/ sits in the project root");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("components").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    match guests::build(root) {
        Ok(dir) => println!("cargo:rustc-env=CASCADE_COMPONENTS_DIR={}", dir.display()),
        Err(message) => panic!("{message}"),
    }
}
