# Host config for the virt examples (nomad-driver-virt's plugin config, seed 003):
#   vmdriver run examples/virt-storage.nomad.hcl --host-config examples/virt-host.hcl
# In Nomad, the same body goes in the agent's plugin "virt" { config { ... } } block.
image_paths = ["/var/lib/virt/images"]

storage_pools {
  directory "local" {
    path = "/var/lib/virt/storage"
  }
}
