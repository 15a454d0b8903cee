#!/usr/bin/env python3
"""A real ActiveSync device for the tests: pyactivesync 0.17.0 speaking EAS 14.1 WBXML.

Two modes, both printing one JSON object per line on stdout (flushed at once, so a test can
react to a line while the driver keeps going):

Steps (the conversation of a device):

    eas_client.py --url https://127.0.0.1:PORT --ca CA.pem --cert CERT.pem --key KEY.pem \
        --user alice --device-id DEV1 --steps provision,foldersync,sync,wait,ping,sync,sendmail \
        [--to bob@corp.test --subject S --body B] [--state FILE] [--header 'Name: value']... \
        [--basic USER:PASSWORD] [--device-type iPhone] [--heartbeat 60]

  provision   Provision. SOGo answers without a PolicyKey, which pyactivesync treats as an
              error: the device is marked provisioned and goes on (reported as "no_policy_key").
  foldersync  FolderSync from SyncKey 0: folder count, names, and the Inbox's id.
  sync        Sync of the Inbox: the first one bootstraps (SyncKey 0) and then fetches; later
              ones are incremental from the stored SyncKey. Reports the subjects added.
  ping        Ping on the Inbox. Prints {"step":"ping","phase":"sent"} just before the request,
              then the result: status ("1" idle, "2" changes), changed folder ids, seconds.
  sendmail    SendMail of a text message from --user's address to --to.
  whoami      Settings/UserInformation Get: the SMTP addresses of the account SOGo serves.
  wait        Prints {"step":"wait"} and blocks until a line arrives on stdin (the test's turn).

  Each result line carries "ok"; on an error the line has "ok": false, "error" and, for an
  HTTP error, "http_status"; the driver then stops with exit code 1.
  --state FILE keeps the policy key, folders and Inbox SyncKey across invocations.

Raw (one hand-made request, for attacks):

    eas_client.py --url ... --ca ... --cert ... --key ... \
        --raw-query 'Cmd=FolderSync&User=bob&DeviceId=X&DeviceType=iPhone' \
        [--header 'x-webobjects-remote-user: bob']...

  Sends one POST to /Microsoft-Server-ActiveSync?QUERY with a body fitting the command
  (FolderSync from key 0, Settings UserInformation, or empty) and prints
  {"raw": true, "status": HTTP status, "folders": n, "emails": [...]} (the last two when the
  answer is WBXML that says so).

The transport is the library's own requests.Session with .cert/.verify set from the flags,
.auth None (or --basic), and trust_env off (REQUESTS_CA_BUNDLE would override verify).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from email.message import EmailMessage

import requests

try:
    import pyactivesync
    from pyactivesync import _http
    from pyactivesync._codepages import CODEPAGES, PAGE_INDEX, REVERSE
    from pyactivesync._wbxml import WBXMLReader, WBXMLWriter, find, find_all, text_of, wtag
    from pyactivesync.exceptions import EASError, ProvisionError
    from pyactivesync.models import FolderType
except ImportError as error:  # pragma: no cover - reported to the test as a JSON line
    print(
        json.dumps(
            {
                "step": "import",
                "ok": False,
                "error": f"pyactivesync missing ({error}): install it with "
                "`pip install pyactivesync==0.17.0` (the README's test command ./tests/run.sh does this)",
            }
        ),
        flush=True,
    )
    sys.exit(3)

# SOGo advertises 2.5-14.1; the library defaults to 16.1.
_http._EAS_PROTOCOL_VERSION = "14.1"

# Settings code page tokens pyactivesync lacks (MS-ASWBXML code page 18).
_SETTINGS_EXTRA = {
    "UserInformation": 0x1D,
    "EmailAddresses": 0x1E,
    "SmtpAddress": 0x1F,
    "PrimarySmtpAddress": 0x23,
    "Accounts": 0x24,
    "Account": 0x25,
    "AccountId": 0x26,
    "AccountName": 0x27,
    "UserDisplayName": 0x28,
}
for _name, _token in _SETTINGS_EXTRA.items():
    CODEPAGES["Settings"].setdefault(_name, _token)
    REVERSE[PAGE_INDEX["Settings"]].setdefault(_token, _name)

EAS_PATH = "/Microsoft-Server-ActiveSync"


def emit(**fields) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def parse_headers(values: list[str]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep:
            raise SystemExit(f"--header wants 'Name: value', got {value!r}")
        headers[name.strip()] = rest.strip()
    return headers


def configure(session: requests.Session, args: argparse.Namespace) -> None:
    session.trust_env = False
    session.auth = None
    if args.basic:
        user, _, password = args.basic.partition(":")
        session.auth = (user, password)
    if args.cert:
        session.cert = (args.cert, args.key) if args.key else args.cert
    else:
        session.cert = None
    if args.url.startswith("https:"):
        session.verify = args.ca if args.ca else True
    session.headers.update(parse_headers(args.header))


def folder_sync_body() -> bytes:
    w = WBXMLWriter()
    w.tag("FolderHierarchy", "FolderSync", children=[wtag("FolderHierarchy", "SyncKey", text="0")])
    return w.render()


def user_information_body() -> bytes:
    w = WBXMLWriter()
    w.tag(
        "Settings",
        "Settings",
        children=[wtag("Settings", "UserInformation", children=[wtag("Settings", "Get")])],
    )
    return w.render()


def smtp_addresses(nodes) -> list[str]:
    found = []
    for tag in ("Settings.SmtpAddress", "Settings.PrimarySmtpAddress"):
        for node in find_all(nodes, tag):
            text = text_of(node)
            if text and text not in found:
                found.append(text)
    return found


def describe(response: requests.Response) -> dict:
    """What a WBXML answer says, as far as the raw mode cares."""
    seen: dict = {}
    body = response.content
    if response.status_code == 200 and body[:1] == b"\x03":
        try:
            nodes = WBXMLReader(body).parse()
        except Exception as error:  # noqa: BLE001 - a report, not a crash
            seen["wbxml_error"] = str(error)
            return seen
        status = text_of(find(nodes, "FolderHierarchy.Status")) or text_of(find(nodes, "Settings.Status"))
        if status is not None:
            seen["eas_status"] = status
        adds = find_all(nodes, "FolderHierarchy.Add")
        if find(nodes, "FolderHierarchy.FolderSync") is not None:
            seen["folders"] = len(adds)
        emails = smtp_addresses(nodes)
        if emails:
            seen["emails"] = emails
    return seen


def raw(args: argparse.Namespace) -> int:
    session = requests.Session()
    configure(session, args)
    query = args.raw_query
    command = dict(p.partition("=")[::2] for p in query.split("&")).get("Cmd", "")
    body = {"FolderSync": folder_sync_body(), "Settings": user_information_body()}.get(command, b"")
    headers = {
        "Content-Type": "application/vnd.ms-sync.wbxml",
        "MS-ASProtocolVersion": "14.1",
    }
    url = args.url.rstrip("/") + EAS_PATH + "?" + query
    try:
        response = session.post(url, data=body, headers=headers, timeout=args.timeout)
    except requests.RequestException as error:
        emit(raw=True, ok=False, error=f"{type(error).__name__}: {error}")
        return 1
    emit(raw=True, ok=True, status=response.status_code, body_len=len(response.content), **describe(response))
    return 0


class Device:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        server = args.url.split("://", 1)[1].rstrip("/")
        self.client = pyactivesync.Client(
            server,
            args.user,
            "",
            device_id=args.device_id,
            device_type=args.device_type,
            user=args.user,
            timeout=args.timeout,
        )
        transport = self.client._transport
        transport.base_url = args.url.rstrip("/") + EAS_PATH
        configure(transport.session, args)
        self.state = {"policy_key": None, "folders": [], "inbox": None, "sync_key": None}
        if args.state and os.path.exists(args.state):
            with open(args.state) as f:
                self.state.update(json.load(f))
            if self.state["policy_key"] is not None:
                transport.policy_key = self.state["policy_key"] or None
                self.client._provisioned = True

    def save(self) -> None:
        if self.args.state:
            with open(self.args.state, "w") as f:
                json.dump(self.state, f)

    # -- steps -------------------------------------------------------------------------------

    def provision(self) -> dict:
        try:
            key = self.client.provision()
            seen = {"policy_key": key}
        except ProvisionError as error:
            # SOGo grants no PolicyKey; a device carries on without one.
            self.client._provisioned = True
            self.client._transport.policy_key = None
            key = ""
            seen = {"policy_key": None, "no_policy_key": True, "note": str(error)}
        self.state["policy_key"] = key
        return seen

    def foldersync(self) -> dict:
        folders = self.client.list_folders()
        self.state["folders"] = [
            {"id": f.id, "name": f.name, "type": int(f.type), "parent": f.parent_id} for f in folders
        ]
        inbox = next((f for f in folders if f.type == FolderType.INBOX), None)
        if inbox is not None and inbox.id != self.state.get("inbox"):
            self.state["inbox"] = inbox.id
            self.state["sync_key"] = None
        return {
            "folders": len(folders),
            "names": sorted(f.name for f in folders),
            "inbox": inbox.id if inbox else None,
        }

    def _inbox(self) -> str:
        if not self.state.get("inbox"):
            self.foldersync()
        if not self.state.get("inbox"):
            raise EASError("no Inbox in the folder hierarchy")
        return self.state["inbox"]

    def sync(self) -> dict:
        inbox = self._inbox()
        first = not self.state.get("sync_key")
        key = self.state.get("sync_key") or "0"
        rounds = 0
        if first:
            result = self.client.sync_folder(inbox, "0")
            key = result.sync_key
            rounds += 1
        added, changed, deleted = [], 0, 0
        while True:
            result = self.client.sync_folder(inbox, key, window_size=100)
            rounds += 1
            key = result.sync_key
            added.extend(result.added)
            changed += len(result.changed)
            deleted += len(result.deleted)
            if not result.more_available or rounds > 50:
                break
        self.state["sync_key"] = key
        return {
            "first": first,
            "sync_key": key,
            "added": len(added),
            "subjects": [item.fields.get("Email.Subject", "") for item in added],
            "from": [item.fields.get("Email.From", "") for item in added],
            "changed": changed,
            "deleted": deleted,
        }

    def ping(self) -> dict:
        inbox = self._inbox()
        emit(step="ping", phase="sent", folder=inbox)
        started = time.monotonic()
        result = self.client.ping(inbox, heartbeat=self.args.heartbeat, timeout=self.args.heartbeat + 60)
        return {
            "status": result.status,
            "changed": list(result.changed_folder_ids),
            "seconds": round(time.monotonic() - started, 2),
        }

    def sendmail(self) -> dict:
        message = EmailMessage()
        sender = self.args.sender or f"{self.args.user}@corp.test"
        message["From"] = sender
        message["To"] = self.args.to
        message["Subject"] = self.args.subject
        message.set_content(self.args.body)
        self.client.send_mail(message)
        return {"from": sender, "to": self.args.to, "subject": self.args.subject}

    def whoami(self) -> dict:
        self.client._ensure_provisioned()
        answer = self.client._post("Settings", user_information_body())
        nodes = WBXMLReader(answer).parse()
        return {"status": text_of(find(nodes, "Settings.Status")), "emails": smtp_addresses(nodes)}

    def wait(self) -> dict:
        emit(step="wait")
        line = sys.stdin.readline()
        return {"resumed": bool(line)}

    def run(self, steps: list[str]) -> int:
        for step in steps:
            action = getattr(self, step, None)
            if action is None or step.startswith("_") or step in ("run", "save"):
                emit(step=step, ok=False, error="unknown step")
                return 2
            started = time.monotonic()
            try:
                seen = action()
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else None
                emit(step=step, ok=False, http_status=status, error=str(error))
                return 1
            except (EASError, requests.RequestException, ValueError) as error:
                emit(step=step, ok=False, error=f"{type(error).__name__}: {error}")
                return 1
            self.save()
            if step != "wait":
                emit(step=step, ok=True, ms=round((time.monotonic() - started) * 1000), **seen)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="https://127.0.0.1:PORT (the gateway)")
    parser.add_argument("--ca", help="CA bundle that signed the gateway's certificate")
    parser.add_argument("--cert", help="device certificate PEM")
    parser.add_argument("--key", help="device key PEM")
    parser.add_argument("--user", default="device", help="the User= query value and mailbox name")
    parser.add_argument("--device-id", default="SEGTESTDEVICE")
    parser.add_argument("--device-type", default="iPhone")
    parser.add_argument("--steps", default="", help="comma-separated steps")
    parser.add_argument("--state", help="JSON file keeping sync state across invocations")
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value' header")
    parser.add_argument("--basic", help="USER:PASSWORD for an Authorization: Basic header")
    parser.add_argument("--to", default="")
    parser.add_argument("--sender", help="From address for sendmail (default USER@corp.test)")
    parser.add_argument("--subject", default="seg test")
    parser.add_argument("--body", default="sent through seg")
    parser.add_argument("--heartbeat", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--raw-query", help="send one raw request with this query string")
    args = parser.parse_args()
    if args.raw_query is not None:
        return raw(args)
    steps = [s for s in args.steps.split(",") if s]
    if not steps:
        parser.error("--steps or --raw-query is required")
    try:
        device = Device(args)
    except (EASError, ValueError, OSError) as error:
        emit(step="setup", ok=False, error=f"{type(error).__name__}: {error}")
        return 1
    try:
        return device.run(steps)
    finally:
        device.client.close()


if __name__ == "__main__":
    sys.exit(main())
