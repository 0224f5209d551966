//! `kiln-agent`: PID 1 of Kiln's builder VMs. Everything it does is in [`kiln::vm::guest`];
//! it is built static with `cargo xtask agent` (see `kiln::vm::agent`).

fn main() {
    kiln::vm::guest::main()
}
