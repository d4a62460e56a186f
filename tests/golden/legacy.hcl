# Seed-era keys (Nomad 0.1): image_source, checksum, host_port, guest_port.
job "legacy" {
  group "g" {
    task "old" {
      driver = "qemu"
      config {
        image_source = "http://example.invalid/images/old.img"
        checksum     = "d41d8cd98f00b204e9800998ecf8427e"
        host_port    = 18080
        guest_port   = 80
      }
    }
  }
}
