# The demo job: vmdriver's own test guest, served over HTTP on a host port.
# `vmdriver run examples/demo.nomad.hcl`, then: curl http://127.0.0.1:8080/
job "demo" {
  group "vm" {
    network {
      port "http" {
        static = 8080
      }
    }

    task "guest" {
      driver = "qemu"

      # The image next to the job file (built by guest/build.sh) is copied into
      # the task dir's local/, where a relative image_path points.
      artifact {
        source = "../guest/out/disk.qcow2"
      }

      config {
        image_path        = "local/disk.qcow2"
        accelerator       = "auto"
        graceful_shutdown = true
        guest_agent       = true
        port_map {
          http = 8080
        }
      }

      resources {
        memory = 256
        cores  = 1
      }

      kill_timeout = "20s"
    }
  }
}
