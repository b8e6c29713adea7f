"""The SDK's conformance kit: every rule of the codec contract, one test per check.

The kit loads the golden vectors and the message strategy from the package's
``conformance`` subpackage. Checks for capabilities the codec does not declare are
skipped, each with its reason.
"""

from metaprotocol_sdk.testing import CodecConformance

from {{ cookiecutter.package_name }} import {{ cookiecutter.__codec_class }}


class TestConformance(CodecConformance):
    """Run the kit against the codec."""

    codec = {{ cookiecutter.__codec_class }}
