fn main() {
    print!("{}", mcp_warden::api::crds_yaml().unwrap());
}
