# nomad-driver-virt's first example: a Python web server on a cloud image,
# reached through a port published from a bridge. Adapted to a local image:
# vmdriver's Debian 12 cloud guest (guest/cloud/build.sh), which has python3.
# The bridge virbr0 is the host's (libvirt's default network) or a managed
# network of the host config: network "default" { bridge = "virbr0" subnet = "192.168.122.0/24" }.
#   vmdriver run examples/virt-python-server.nomad.hcl --host-config examples/virt-host.hcl
job "python-server" {
  group "virt-group" {
    count = 1

    network {
      mode = "host"
      port "http" {
        to = 8000
      }
    }

    task "virt-task" {
      driver = "virt"

      artifact {
        source      = "../guest/cloud/out/disk.qcow2"
        destination = "local/debian-12-cloud.qcow2"
        mode        = "file"
      }

      config {
        default_user_password = "password"
        cmds                  = ["python3 -m http.server 8000"]

        disk {
          size = "10GiB"
          source {
            image = "local/debian-12-cloud.qcow2"
          }
        }

        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["http"]
          }
        }
      }

      resources {
        cores  = 2
        memory = 1024
      }

      # vmdriver asks the guest to shut down (guest agent, then ACPI) before it
      # signals QEMU; a systemd guest under TCG needs more than Nomad's default 5s.
      kill_timeout = "60s"
    }
  }
}
