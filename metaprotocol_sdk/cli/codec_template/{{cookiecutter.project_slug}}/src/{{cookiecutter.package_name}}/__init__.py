"""{{ cookiecutter.description.rstrip('.') }}.

The codec is registered in the ``metaprotocol.codecs`` entry-point group under
``aeraki.meta_protocol.codec.{{ cookiecutter.protocol_name }}`` and the alias
``{{ cookiecutter.protocol_name }}`` (see pyproject.toml).
"""

from .codec import {{ cookiecutter.__codec_class }}

__version__ = "{{ cookiecutter.version }}"

__all__ = ["{{ cookiecutter.__codec_class }}", "__version__"]
