"""Admin: status views of the DB (CLI table, JSON, HTTP)."""

from dicomnode.admin.status import collect_status, format_status

__all__ = ["collect_status", "format_status"]
