"""WorkBinder's properties files: read the shipped ones, render the lab's."""

from __future__ import annotations

import re
from collections.abc import Mapping

from lab.errors import LabError

# Keys WorkBinder reads from binder.properties (besides the per-CE and per-application
# families below); anything else in a scenario is a typo or a wish.
BINDER_KEYS = frozenset(
    {
        "ListeningPort",
        "AdminPort",
        "ShutDownCommand",
        "CEs",
        "MinPoolSize",
        "DefaultMinJobsOnCE",
        "DefaultMaxJobsOnCE",
        "DefaultMaxSecsSubmittedJob",
        "DefaultMaxSecsReadyJob",
        "DefaultMaxSecsReusableJob",
        "DefaultMaxSecsSubmittedJobCorrectiveCoefficientForReadyJobs",
        "DefaultMaxSecsSubmittedJobCorrectiveCoefficientForDiscardedJobs",
        "DefaultMultiplicationCoefficientForMaxSecsAgedJobs",
        "DefaultMaxWallClockTime",
        "HtmlFileName",
        "HTMLFileCreationInterval",
        "gstatHomeURL",
        "DefaultApplicationList",
        "DefaultApplicationHandler",
        "JobSubmissionType",
        "Script",
        "IdleTimeout",
        "PanicModeCEPercent",
        "UseSSL",
        "RecoveryType",
        "GeneratePerformanceMonitoringEvents",
        "PluginsDir",
        "AppsPropertiesFile",
        "PROCESS_TWEAK_ENABLED",
        "ClientSamplingInterval",
        "ClientFreqCoeff",
        "BinderBusyCoeff",
        "BinderClientsCoeff",
        "RequireClientAuth",
        "AuthzType",
        "CertificatesDir",
        "VomsDir",
        "GliteLoc",
        "BinderCert",
        "VO",
        "CrlUpdateInterval",
        "CredentialsUpdateInterval",
    }
)
PER_CE_SUFFIXES = (
    "_CE",
    "_MinJobsOnCE",
    "_MaxJobsOnCE",
    "_MaxSecsSubmittedJob",
    "_ApplicationList",
    "_VOMSAuth",
    "_MaxSecsSubmittedJobCorrectiveCoefficientForReadyJobs",
)
PER_APP_SUFFIXES = ("_ApplicationHandler",)
# The stand-in's own timing keys; WorkBinder ignores them.
STANDIN_PREFIX = "LabStandin"


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties as WorkBinder's files use them: key = value, # comments, \\ joins."""
    result: dict[str, str] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            logical += line[:-1]
            continue
        logical += line
        match = re.match(r"^([^=:\s]+)\s*[=:\s]\s*(.*)$", logical)
        if match:
            result[match.group(1)] = match.group(2).strip()
        elif logical:
            result[logical] = ""
        logical = ""
    return result


def render_properties(values: Mapping[str, object], header: str) -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def known_key(key: str) -> bool:
    return (
        key in BINDER_KEYS
        or key.startswith(STANDIN_PREFIX)
        or any(key.endswith(s) and len(key) > len(s) for s in PER_CE_SUFFIXES + PER_APP_SUFFIXES)
    )


def check_override_keys(overrides: Mapping[str, object]) -> None:
    unknown = sorted(key for key in overrides if not known_key(key))
    if unknown:
        raise LabError(
            f"unknown binder properties {', '.join(unknown)}: the lab knows "
            f"{', '.join(sorted(BINDER_KEYS))}, per-CE keys <CE>{'/<CE>'.join(PER_CE_SUFFIXES)}, "
            f"and {STANDIN_PREFIX}* for the stand-in"
        )
