"""`frugallm report`: DeepSeek's claims measured on this host (docs/report.md)."""

from .core import Finding, Section, run_report

__all__ = ["Finding", "Section", "run_report", "sections", "select"]


def sections():
    """Every section, in the report's order (importing them loads torch-heavy code: called on demand)."""
    from .instant import SECTIONS as instant
    from .measured import SECTIONS as measured
    from .trained import SECTIONS as trained

    return [*instant, *trained, *measured]


def select(only: str | None) -> list:
    """The sections `--only` names (comma-separated), in the report's order; None or "" = every section."""
    chosen = sections()
    if not only:
        return chosen
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in chosen})
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such section; choose from "
                         f"{', '.join(s.name for s in chosen)}")
    return [s for s in chosen if s.name in names]
