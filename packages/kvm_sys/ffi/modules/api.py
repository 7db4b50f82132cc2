"""System ioctls of <linux/kvm.h>."""

INCLUDES = "#include <linux/kvm.h>\n"
TYPES = """
#define KVMIO ...
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
"""
FUNCTIONS = ""
CUSTOMIZATIONS = ""
