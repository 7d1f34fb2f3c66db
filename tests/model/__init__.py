"""Independent executable reference model of the s390 KVM PV interface (see docs/MODEL.md)."""
