"""{{ cookiecutter.description.rstrip('.') }}.

The filter is registered in the ``metaprotocol.filters`` entry-point group under
``aeraki.meta_protocol.filters.{{ cookiecutter.filter_name }}`` and the alias
``{{ cookiecutter.filter_name }}`` (see pyproject.toml).
"""

from .filter import {{ cookiecutter.__filter_class }}

__version__ = "{{ cookiecutter.version }}"

__all__ = ["{{ cookiecutter.__filter_class }}", "__version__"]
