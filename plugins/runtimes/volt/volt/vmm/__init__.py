"""The Volt VMM proper: KVM plumbing, loaders, devices and the VM assembly."""
