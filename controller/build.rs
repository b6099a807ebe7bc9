// The migrations are embedded with `embed_migrations!`; rebuild when any of them changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
