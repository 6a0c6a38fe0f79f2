// How much work one server pod admits, derived from what the pod has: its memory limit bounds the decoded audio it
// holds, its /tmp volume the uploads it spools. The server refuses work past each bound with 503 and Retry-After
// (--max-queued-audio-seconds, --max-spool-mb, --max-concurrent-uploads) instead of being OOM-killed or evicted.
import { Dtype, serverHostMemoryGiB } from "./catalog";
import { RealtimeLimits } from "./config";

/** Decoded audio: 16 kHz mono float32, as measured in the HTTP process (service/bench/audio_memory.py, and
 * service/tests/test_hostile_audio.py on a real server: decoding and voice detection run block by block). */
export const decodedAudioKiBPerSecond = 64;
/** The server holds each second twice: in the HTTP process and again in the engine process. */
export const heldAudioCopies = 2;
/** A live session's largest message is held three times while it is handled: the frame's text, the parsed event's
 *  base64 audio string, and its decoded bytes (three quarters of it, rounded up to a whole copy). */
export const heldMessageCopies = 3;
/** Memory left unbudgeted: allocator fragmentation, page cache of the spool files. */
export const memoryMarginFraction = 0.1;
/** /tmp space left beside the spool budget (Python's and PyAV's own temporary files). */
export const tmpReserveMiB = 256;

export interface ServerLimitsInput {
    /** The pod's memory limit, MiB. */
    memoryLimitMiB: number;
    modelId: string;
    dtype: Dtype;
    maxAudioSeconds: number;
    maxUploadMb: number;
    /** The /tmp emptyDir's sizeLimit, GiB. */
    uploadSpoolGiB: number;
    /** Live sessions: each holds up to its buffered audio and one message of the largest size. */
    realtime: Pick<RealtimeLimits, "maxSessions" | "maxBufferedSeconds" | "maxMessageMb">;
}

export interface ServerLimits {
    /** Seconds of decoded audio held at once, across requests (WHISPER_MAX_QUEUED_AUDIO_SECONDS). */
    maxQueuedAudioSeconds: number;
    /** Upload bytes spooled to /tmp at once, MB of 2^20 bytes (WHISPER_MAX_SPOOL_MB). */
    maxSpoolMb: number;
    /** Uploads received at once: as many as fit the spool at the largest upload (WHISPER_MAX_CONCURRENT_UPLOADS). */
    maxConcurrentUploads: number;
    /** Memory the audio of file requests may use, MiB, after the server's processes, the model, live sessions and
     * the margin. */
    audioMemoryMiB: number;
    /** Memory live sessions may hold at the session limit, MiB (realtimeSessionsMemoryMiB). */
    realtimeMemoryMiB: number;
}

/**
 * What live sessions hold at worst, MiB: every session the pod admits (maxRealtimeSessions) with its most audio
 * ahead of the decoder (realtimeMaxBufferedSeconds of 16 kHz float32, in both processes: the session's buffer and
 * the turn's windows in the engine) and one message of the largest size being read. Live audio is not counted in
 * --max-queued-audio-seconds, so it is set aside here: a pod at its session limit is not OOM-killed.
 */
export function realtimeSessionsMemoryMiB(realtime: ServerLimitsInput["realtime"]): number {
    const perSessionMiB = (realtime.maxBufferedSeconds * decodedAudioKiBPerSecond * heldAudioCopies) / 1024 + realtime.maxMessageMb * heldMessageCopies;
    return realtime.maxSessions * perSessionMiB;
}

/**
 * The bounds that make the worst case fit the pod. Audio: what is left of the limit after the margin, the server's
 * processes and model, live sessions at their limit (realtimeSessionsMemoryMiB), and one more copy of the longest file (room for the files being decoded: 16 MiB each, one per
 * core, measured), at 128 KiB a second. Spool: the /tmp volume less its reserve. A bound below one request at its largest (maxAudioSeconds,
 * maxUploadMb) means the pod cannot serve that request at all: config refuses it (infra/config-rules.ts).
 */
export function serverLimits(input: ServerLimitsInput): ServerLimits {
    const hostMiB = serverHostMemoryGiB(input.modelId, input.dtype) * 1024;
    const transientMiB = (input.maxAudioSeconds * decodedAudioKiBPerSecond) / 1024;
    const realtimeMemoryMiB = realtimeSessionsMemoryMiB(input.realtime);
    const audioMemoryMiB = Math.max(0, input.memoryLimitMiB * (1 - memoryMarginFraction) - hostMiB - realtimeMemoryMiB - transientMiB);
    const maxQueuedAudioSeconds = Math.floor((audioMemoryMiB * 1024) / (decodedAudioKiBPerSecond * heldAudioCopies));
    const maxSpoolMb = Math.max(0, input.uploadSpoolGiB * 1024 - tmpReserveMiB);
    const maxConcurrentUploads = Math.max(1, Math.floor(maxSpoolMb / input.maxUploadMb));
    return { maxQueuedAudioSeconds, maxSpoolMb, maxConcurrentUploads, audioMemoryMiB, realtimeMemoryMiB };
}

/** The longest audio one request may have for the pod to hold it: the largest maxAudioSeconds the memory allows. */
export function longestAudioSecondsThatFits(input: Omit<ServerLimitsInput, "maxAudioSeconds">): number {
    // Held: 2 copies of the audio admitted, and 1 more of the longest file: (2 + 1) × 64 KiB a second, beside live sessions.
    const budgetMiB =
        input.memoryLimitMiB * (1 - memoryMarginFraction) - serverHostMemoryGiB(input.modelId, input.dtype) * 1024 - realtimeSessionsMemoryMiB(input.realtime);
    return Math.max(0, Math.floor((budgetMiB * 1024) / (decodedAudioKiBPerSecond * (heldAudioCopies + 1))));
}
