"""A round's updates from arrival to booking: received (fresh, or resumed at the byte a
cut upload reached), logged, handed to the aggregate, booked, acknowledged; and after a
restart, taken again from the round's log.

Every update goes the same way, whether it streams from a client or is read back from
the log (`server/round_log.py`): the intake spools and verifies it whole
(`server/intake.py`), the round's log keeps it before the receipt goes out, the
safeguards and the strategy see it (`GuardedAggregate.arrived`), and the round books it.
Cut uploads wait in `server/partial_uploads.py` for their client to resume them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fedstream.common.errors import FedstreamError
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.server.admission.sessions import ClientRecord
from fedstream.server.calls import UpdateClaim, UploadTrailer
from fedstream.server.guarded_aggregate import GuardedAggregate
from fedstream.server.intake import UploadIntake
from fedstream.server.partial_uploads import PartialUploads, UploadKey
from fedstream.server.phases import OpenRound
from fedstream.server.round_log import LoggedUpdate, PendingRound, RoundLog
from fedstream.server.updates import VerifiedUpdate

log = logging.getLogger(__name__)


def key_of(open_round: OpenRound) -> UploadKey:
    return UploadKey(open_round.number, open_round.attempt, open_round.model_version)


class RoundUploads:
    """Takes updates into the round in flight."""

    def __init__(
        self,
        intake: UploadIntake,
        aggregation: GuardedAggregate,
        partials: PartialUploads,
        round_log: RoundLog | None,
    ) -> None:
        self.intake = intake
        self.aggregation = aggregation
        self.partials = partials
        self.round_log = round_log
        """None: updates are not logged (a coordinator embedded without a run's log)."""

    def begin(self, open_round: OpenRound) -> None:
        """A round (or a new try of one) is open: what was kept for another goes."""
        self.partials.retain(key_of(open_round))
        self.intake.begin_round(open_round.number)
        if self.round_log is not None:
            self.round_log.begin(
                open_round.number,
                open_round.attempt,
                open_round.model_version,
                open_round.selected,
            )

    def pending(self, number: int, model_version: int) -> PendingRound | None:
        """Round `number` as the log holds it from before a restart, if it does."""
        return self.round_log.pending(number, model_version) if self.round_log else None

    @staticmethod
    def streaming(open_round: OpenRound | None, client: ClientRecord) -> bool:
        """Whether an upload of `client`'s is still streaming into `open_round`."""
        return open_round is not None and client.name in open_round.uploading

    def offset(
        self, client: str, open_round: OpenRound | None, number: int, version: int, attempt: int
    ) -> int:
        """Bytes held of `client`'s cut upload for round `number`'s try `attempt`, which
        trains model `version`."""
        if open_round is None or (open_round.number, open_round.model_version) != (number, version):
            return 0
        if attempt and attempt != open_round.attempt:
            return 0
        return self.partials.offset(client, key_of(open_round))

    async def receive(
        self,
        open_round: OpenRound,
        client: ClientRecord,
        claim: UpdateClaim,
        chunks: AsyncIterator[memoryview],
    ) -> None:
        """Spool, verify, log and book `client`'s upload into `open_round`."""
        manifest = self.intake.check_manifest(claim.manifest)
        key = key_of(open_round)
        layout = claim.manifest.SerializeToString(deterministic=True)
        resume = None
        if claim.resume_offset:
            resume = self.partials.take(client.name, key, layout, claim.resume_offset)
            open_round.uploads_resumed += 1
        with open_round.upload_from(client.name):
            async with self.intake.receive(
                f"r{open_round.number}-{client.name}",
                client.name,
                claim.num_examples,
                claim.metrics,
                manifest,
                open_round.while_open(chunks),
                trailer=claim.trailer,
                resume=resume,
                keep=lambda spool: self.partials.keep(client.name, key, layout, spool),
            ) as update:
                open_round.check_accepting()
                await self._book(open_round, update, claim.manifest, None)
        if not self.aggregation.keeps_updates:
            update.release()
        log.info(
            "round %d: update from %s (%d examples, %s reported)",
            open_round.number,
            client.name,
            claim.num_examples,
            open_round.progress(),
        )

    async def take_logged(self, open_round: OpenRound, pending: PendingRound) -> None:
        """Book the updates the log held when the coordinator restarted, each verified
        again as an upload would be; one that fails is dropped and its client asked again."""
        for entry in pending.updates:
            try:
                await self._take(open_round, entry)
            except FedstreamError as exc:
                open_round.awaiting_log.discard(entry.client)
                log.warning(
                    "round %d: the logged update of %s is not taken (%s); it is asked again",
                    open_round.number,
                    entry.client,
                    exc,
                )
                if self.round_log is not None:
                    self.round_log.forget(entry)

    async def _take(self, open_round: OpenRound, entry: LoggedUpdate) -> None:
        header = entry.header
        claim = UpdateClaim(
            open_round.number,
            open_round.model_version,
            int(header["num_examples"]),
            dict(header["metrics"]),
            entry.manifest,
        )
        open_round.check_update(entry.client, claim)
        if entry.client in open_round.reported:
            return
        manifest = self.intake.check_manifest(claim.manifest)
        async with self.intake.receive(
            f"r{open_round.number}-{entry.client}-logged",
            entry.client,
            claim.num_examples,
            claim.metrics,
            manifest,
            entry.chunks(),
            trailer=UploadTrailer(str(header.get("sha256", "-"))),
        ) as update:
            await self._book(open_round, update, claim.manifest, entry)
            open_round.awaiting_log.discard(entry.client)
        if not self.aggregation.keeps_updates:
            update.release()
        open_round.updates_from_log += 1
        log.info(
            "round %d: update of %s taken from the round's log (%d examples, %s reported)",
            open_round.number,
            entry.client,
            claim.num_examples,
            open_round.progress(),
        )

    async def _book(
        self,
        open_round: OpenRound,
        update: VerifiedUpdate,
        manifest: pb.Manifest,
        logged: LoggedUpdate | None,
    ) -> None:
        """Log the verified `update` (unless it comes from the log), hand it to the
        aggregate, and book it; an update the aggregate refuses leaves the log again."""
        number, attempt = open_round.number, open_round.attempt
        if logged is None and self.round_log is not None:
            logged = await asyncio.to_thread(
                self.round_log.append, number, attempt, open_round.model_version, update, manifest
            )
        try:
            await self.aggregation.arrived(update, len(open_round.selected))
        except BaseException:
            if logged is not None and self.round_log is not None:
                self.round_log.forget(logged)
            raise
        open_round.book(update)

    def close(self) -> None:
        self.partials.clear()
