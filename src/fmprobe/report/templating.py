"""One Jinja environment for every HTML report, so reports share partials (styles, the gates tables)."""

from __future__ import annotations

from typing import Any

import jinja2

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("fmprobe.report", "templates"), autoescape=True)


def render(name: str, **context: Any) -> str:
    return _ENV.get_template(name).render(**context)
