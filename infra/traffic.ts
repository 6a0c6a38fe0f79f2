// The load balancer in front of the service, made by the AWS Load Balancer Controller and chosen for long requests:
// while a file is transcribed the connection is silent for up to requestTimeoutSeconds, and a live session's WebSocket
// for up to its idle timeout, so the load balancer's idle timeout must outlast both (the server, not the load balancer,
// ends a silent session, with an error event that says why). Plain HTTP: an NLB TCP listener (idle timeout 60-6000 s). TLS: an NLB TLS
// listener's idle timeout is fixed at 350 s, so the service gets an ALB with an HTTPS listener instead (idle timeout
// 1-4000 s). Limits from the Elastic Load Balancing guides ("Update the TCP idle timeout", LoadBalancerAttribute).
import { LoadBalancerScheme } from "./config";

export interface TrafficSettings {
    scheme: LoadBalancerScheme;
    sourceRanges: string[];
    /** An ACM certificate: an ALB terminates TLS on 443 with it. */
    certificateArn?: string;
}

/** What the load balancer needs to know of the server: the longest request, a live session's idle timeout, its drain, and its probes. */
export interface Backend {
    requestTimeoutSeconds: number;
    realtimeIdleSeconds: number;
    drainSeconds: number;
    readinessPath: string;
}

/** How long after the longest request a silent connection may stay open. */
export const idleMarginSeconds = 60;
/** An NLB TCP listener's idle timeout range. */
export const nlbTcpIdleTimeoutSeconds = { min: 60, max: 6000 };
/** The fixed idle timeout of an NLB TLS listener: why TLS goes through an ALB. */
export const nlbTlsIdleTimeoutSeconds = 350;
/** An ALB's idle timeout range (`idle_timeout.timeout_seconds`). */
export const albIdleTimeoutSeconds = { min: 1, max: 4000 };
/** The longest target group deregistration delay, NLB and ALB alike. */
export const maxDeregistrationDelaySeconds = 3600;
/** The IngressClass the controller's chart creates. */
export const albIngressClass = "alb";
/** TLS 1.3 and 1.2 with forward secrecy only. */
export const albSslPolicy = "ELBSecurityPolicy-TLS13-1-2-2021-06";

/** The idle timeout the load balancer gets: the longest silence (a request, an idle live session) and a margin, within the listener's range. */
export const idleTimeoutSeconds = (backend: Pick<Backend, "requestTimeoutSeconds" | "realtimeIdleSeconds">, range: { min: number; max: number }): number =>
    Math.min(range.max, Math.max(range.min, Math.max(backend.requestTimeoutSeconds, backend.realtimeIdleSeconds) + idleMarginSeconds));

/** A deregistered pod keeps its open connections until the server's drain is over. */
const deregistrationDelay = (backend: Backend) => `deregistration_delay.timeout_seconds=${Math.min(maxDeregistrationDelaySeconds, backend.drainSeconds)}`;

/** Annotations of the `type: LoadBalancer` Service for an NLB with a TCP listener on port 80 (plain HTTP). */
export function nlbAnnotations(traffic: TrafficSettings, backend: Backend): Record<string, string> {
    const prefix = "service.beta.kubernetes.io/aws-load-balancer";
    return {
        [`${prefix}-scheme`]: traffic.scheme,
        // IP targets: the NLB sends straight to pod IPs, and health checks see each pod's own readiness.
        [`${prefix}-nlb-target-type`]: "ip",
        [`${prefix}-healthcheck-protocol`]: "http",
        [`${prefix}-healthcheck-path`]: backend.readinessPath,
        [`${prefix}-healthcheck-port`]: "traffic-port",
        [`${prefix}-healthcheck-interval`]: "10",
        [`${prefix}-healthcheck-healthy-threshold`]: "2",
        [`${prefix}-healthcheck-unhealthy-threshold`]: "2",
        [`${prefix}-attributes`]: "load_balancing.cross_zone.enabled=true",
        [`${prefix}-target-group-attributes`]: deregistrationDelay(backend),
        [`${prefix}-listener-attributes.TCP-80`]: `tcp.idle_timeout.seconds=${idleTimeoutSeconds(backend, nlbTcpIdleTimeoutSeconds)}`,
    };
}

/** Annotations of the Ingress for an ALB with one HTTPS listener on 443 that sends to the pods' IPs. */
export function albAnnotations(traffic: TrafficSettings & { certificateArn: string }, backend: Backend): Record<string, string> {
    const prefix = "alb.ingress.kubernetes.io";
    return {
        [`${prefix}/scheme`]: traffic.scheme,
        [`${prefix}/target-type`]: "ip",
        [`${prefix}/listen-ports`]: JSON.stringify([{ HTTPS: 443 }]),
        [`${prefix}/certificate-arn`]: traffic.certificateArn,
        [`${prefix}/ssl-policy`]: albSslPolicy,
        // The ALB's security group admits these sources only (what loadBalancerSourceRanges does for the NLB).
        [`${prefix}/inbound-cidrs`]: traffic.sourceRanges.join(","),
        [`${prefix}/backend-protocol`]: "HTTP",
        [`${prefix}/healthcheck-protocol`]: "HTTP",
        [`${prefix}/healthcheck-path`]: backend.readinessPath,
        [`${prefix}/healthcheck-port`]: "traffic-port",
        [`${prefix}/healthcheck-interval-seconds`]: "10",
        [`${prefix}/healthcheck-timeout-seconds`]: "5",
        [`${prefix}/healthy-threshold-count`]: "2",
        [`${prefix}/unhealthy-threshold-count`]: "2",
        [`${prefix}/success-codes`]: "200",
        [`${prefix}/load-balancer-attributes`]: `idle_timeout.timeout_seconds=${idleTimeoutSeconds(backend, albIdleTimeoutSeconds)}`,
        [`${prefix}/target-group-attributes`]: deregistrationDelay(backend),
    };
}
