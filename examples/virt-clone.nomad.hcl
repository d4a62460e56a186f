# nomad-driver-virt's clone example: a full copy of a volume already in the pool
# (a reflink where the file system has them), grown to 10 GiB. Put the golden
# volume there first, e.g.
#   cp guest/out/disk.qcow2 /var/lib/virt/storage/test-guest.qcow2
#   vmdriver run examples/virt-clone.nomad.hcl --host-config examples/virt-host.hcl
job "python-server" {
  group "virt-group" {
    task "virt-task" {
      driver = "virt"

      config {
        disk {
          size = "10GiB"
          pool = "local"
          source {
            volume = "test-guest.qcow2"
          }
        }
      }
    }
  }
}
