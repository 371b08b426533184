"""Admin: the admin app (API, dashboard, auth, metrics), the documented actions, retention, status views."""

from dicomnode.admin.status import collect_status, format_status

__all__ = ["collect_status", "format_status"]
