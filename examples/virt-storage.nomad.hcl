# nomad-driver-virt's disk example: a primary disk made from an image, grown to
# 10 GiB, and a second, empty disk. Adapted to a local image (vmdriver's test
# guest, next to this file) and to one directory pool: the original put the
# second disk in a Ceph pool, which needs `ceph "NAME" {}` in storage_pools.
#   vmdriver run examples/virt-storage.nomad.hcl --host-config examples/virt-host.hcl
job "python-server" {
  group "virt-group" {
    task "virt-task" {
      artifact {
        source      = "../guest/out/disk.qcow2"
        destination = "local/disk.qcow2"
        mode        = "file"
      }

      driver = "virt"

      config {
        disk {
          size    = "10GiB"
          pool    = "local"
          primary = true
          source {
            image = "local/disk.qcow2"
          }
        }

        disk {
          size = "20GB"
          pool = "local"
        }
      }
    }
  }
}
