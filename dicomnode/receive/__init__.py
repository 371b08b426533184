"""The receive stage: C-ECHO / C-STORE SCP writing durable spool files and index rows."""

from dicomnode.receive.header import HeaderError, InstanceHeader, parse_header
from dicomnode.receive.scp import ReceiveStage

__all__ = ["HeaderError", "InstanceHeader", "ReceiveStage", "parse_header"]
