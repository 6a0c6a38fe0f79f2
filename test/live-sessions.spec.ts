// Live transcription sessions (/v1/realtime) as the program deploys them, evaluated offline: the stack config's
// session limits reach the server as its WHISPER_* settings, KEDA counts live sessions as load, the NLB and the ALB
// keep a silent WebSocket open past the session's idle timeout, and an alert watches live turn latency.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import { alertRealtimeTurnLatencyP95MsRange, realtimeIdleSecondsRange } from "../infra/load-config";
import { evaluateStack, findResource, findResources, repoRoot, StackEvaluation, tryEvaluateStack } from "../scripts/offline-stack";

const certificateArn = "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d-0a1b-0a1b-0a1b-0a1b2c3d4e5f";
const config = (evaluation: StackEvaluation, key: string) => evaluation.config[`whisper-eks:${key}`] as number;
const serverEnv = (evaluation: StackEvaluation): Record<string, string> =>
    Object.fromEntries(
        findResource(evaluation.resources, "kubernetes:apps/v1:Deployment").inputs.spec.template.spec.containers[0].env.map((variable: any) => [
            variable.name,
            variable.value,
        ]),
    );
const triggers = (evaluation: StackEvaluation): any[] => findResource(evaluation.resources, "kubernetes:keda.sh/v1alpha1:ScaledObject").inputs.spec.triggers;
const alertRule = (evaluation: StackEvaluation, name: string) =>
    findResource(evaluation.resources, "kubernetes:monitoring.coreos.com/v1:PrometheusRule")
        .inputs.spec.groups.flatMap((group: any) => group.rules)
        .find((rule: any) => rule.alert === name) ?? assert.fail(`alert ${name}`);

/** The idle timeout of the load balancer the stack deploys: the ALB's (TLS) or the NLB TCP listener's. */
function loadBalancerIdleSeconds(evaluation: StackEvaluation): number {
    const ingress = findResources(evaluation.resources, "kubernetes:networking.k8s.io/v1:Ingress")[0];
    if (ingress) return Number(/idle_timeout\.timeout_seconds=(\d+)/.exec(ingress.inputs.metadata.annotations["alb.ingress.kubernetes.io/load-balancer-attributes"])![1]);
    const annotations = findResource(evaluation.resources, "kubernetes:core/v1:Service").inputs.metadata.annotations;
    return Number(/tcp\.idle_timeout\.seconds=(\d+)/.exec(annotations["service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80"])![1]);
}

/** The server's Settings fields and their defaults (service/whisper_server/settings.py). */
function serverSettingDefaults(): Map<string, number> {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "settings.py"), "utf8");
    return new Map([...source.matchAll(/^\s{4}(\w+): (?:int|float) = ([\d.]+)/gm)].map((match) => [match[1], Number(match[2])]));
}

/** The finite bucket bounds of a histogram the server declares (service/whisper_server/metrics.py). */
function serverHistogramBuckets(name: string): number[] {
    const source = fs.readFileSync(path.join(repoRoot, "service", "whisper_server", "metrics.py"), "utf8");
    const tuple = /buckets=\(([^)]*)\)/.exec(source.slice(source.indexOf(`"${name}"`)))?.[1] ?? assert.fail(`${name} declares its buckets`);
    return tuple.split(",").map((bound) => Number(bound.trim()));
}

/** Stack config key -> the server setting it sets. */
const realtimeKeys: Record<string, string> = {
    maxRealtimeSessions: "max_realtime_sessions",
    realtimeIdleSeconds: "realtime_idle_seconds",
    realtimeMaxSessionSeconds: "realtime_max_session_seconds",
    realtimeMaxMessageMb: "realtime_max_message_mb",
    realtimeMaxBufferedSeconds: "realtime_max_buffered_seconds",
    realtimeMaxPendingEvents: "realtime_max_pending_events",
};

describe("live sessions (/v1/realtime) on the cluster", function () {
    let prod: StackEvaluation;
    before(async function () {
        prod = await evaluateStack("prod");
    });

    it("passes every session limit from stack config to the server, whose defaults the stack's defaults equal", async function () {
        const defaults = serverSettingDefaults();
        for (const [key, setting] of Object.entries(realtimeKeys)) {
            assert.equal(Number(serverEnv(prod)[`WHISPER_${setting.toUpperCase()}`]), config(prod, key), key);
            assert.equal(config(prod, key), defaults.get(setting), `${key} defaults to whisper-server's own default`);
        }
        const changed = { maxRealtimeSessions: 10, realtimeIdleSeconds: 30, realtimeMaxSessionSeconds: 600, realtimeMaxMessageMb: 2, realtimeMaxBufferedSeconds: 45, realtimeMaxPendingEvents: 64, targetRealtimeSessions: 8 };
        const variables = serverEnv(await evaluateStack("prod", changed));
        for (const [key, setting] of Object.entries(realtimeKeys)) {
            assert.equal(variables[`WHISPER_${setting.toUpperCase()}`], String(changed[key as keyof typeof changed]), key);
        }
    });

    it("scales on live sessions per pod beside the configured metric, in the Prometheus that scrapes the pods", async function () {
        const [main, sessions, ...rest] = triggers(prod);
        assert.match(main.metadata.query, new RegExp(String(config(prod, "scalingMetric"))), "the configured metric stays the first trigger");
        assert.equal(sessions.type, "prometheus");
        assert.equal(sessions.metricType, "AverageValue", "the service's sessions divided by its pods: a per-pod target");
        assert.equal(sessions.metadata.serverAddress, main.metadata.serverAddress);
        assert.equal(sessions.metadata.query, 'sum(max_over_time(whisper_realtime_sessions{namespace="whisper"}[1m]))');
        assert.equal(Number(sessions.metadata.threshold), config(prod, "targetRealtimeSessions"));
        assert.ok(config(prod, "targetRealtimeSessions") < config(prod, "maxRealtimeSessions"), "pods are added before a pod refuses sessions");
        assert.deepEqual(rest, []);
        // Whatever the file metric, sessions still count.
        const onRequests = await evaluateStack("prod", { scalingMetric: "whisper_requests_in_flight", targetRealtimeSessions: 5 });
        assert.deepEqual(triggers(onRequests).map((trigger) => trigger.metadata.threshold), [String(config(onRequests, "targetInFlightRequests")), "5"]);
    });

    it("keeps a silent WebSocket open on the NLB and the ALB until the server's own idle timeout closes the session", async function () {
        assert.ok(loadBalancerIdleSeconds(prod) > config(prod, "realtimeIdleSeconds"));
        // Sessions that may idle longer than any request: the load balancers follow the session's timeout.
        const idleLonger = { requestTimeoutSeconds: 60, realtimeIdleSeconds: 900 };
        const nlb = await evaluateStack("prod", idleLonger);
        assert.equal(loadBalancerIdleSeconds(nlb), 960);
        const alb = await evaluateStack("prod", { ...idleLonger, tlsCertificateArn: certificateArn, loadBalancerSourceRanges: ["10.0.0.0/8"] });
        assert.equal(findResources(alb.resources, "kubernetes:networking.k8s.io/v1:Ingress").length, 1, "TLS goes through the ALB");
        assert.equal(loadBalancerIdleSeconds(alb), 960);
        // The longest idle timeout config accepts still fits the ALB's (4000 s at most), margin included.
        const longest = await evaluateStack("prod", { realtimeIdleSeconds: realtimeIdleSecondsRange.max, tlsCertificateArn: certificateArn, loadBalancerSourceRanges: ["10.0.0.0/8"] });
        assert.ok(loadBalancerIdleSeconds(longest) > realtimeIdleSecondsRange.max && loadBalancerIdleSeconds(longest) <= 4000);
    });

    it("alerts when live turn latency p95 passes the stack's threshold, which the server's histogram can measure", async function () {
        const rule = alertRule(prod, "WhisperRealtimeTurnLatencyP95");
        const thresholdSeconds = config(prod, "alertRealtimeTurnLatencyP95Ms") / 1000;
        assert.equal(
            rule.expr,
            `histogram_quantile(0.95, sum by (le) (rate(whisper_realtime_turn_latency_seconds_bucket{namespace="whisper"}[5m]))) > ${thresholdSeconds}`,
        );
        assert.ok(rule.for && rule.labels.severity, "held for a while, with a severity");
        assert.match(alertRule(await evaluateStack("prod", { alertRealtimeTurnLatencyP95Ms: 750 }), "WhisperRealtimeTurnLatencyP95").expr, / > 0\.75$/);
        // histogram_quantile never answers above the largest finite bucket: a threshold at or past it could never fire.
        const largest = Math.max(...serverHistogramBuckets("whisper_realtime_turn_latency_seconds"));
        assert.ok(alertRealtimeTurnLatencyP95MsRange.max / 1000 < largest, `thresholds up to ${alertRealtimeTurnLatencyP95MsRange.max} ms < ${largest} s`);
    });

    it("shows live sessions, turn latency and live audio on the Grafana dashboard", function () {
        const dashboard = JSON.parse(findResource(prod.resources, "kubernetes:core/v1:ConfigMap").inputs.data["whisper.json"]);
        const expressions = dashboard.panels.flatMap((panel: any) => panel.targets.map((target: any) => target.expr)).join("\n");
        for (const metric of ["whisper_realtime_sessions{", "whisper_realtime_turn_latency_seconds_bucket", "whisper_realtime_audio_seconds_total"]) {
            assert.ok(expressions.includes(metric), `a panel shows ${metric}`);
        }
    });

    const refused: { what: string; overrides: Record<string, unknown>; expected: string[] }[] = [
        {
            what: "a scaling target above the sessions a pod admits",
            overrides: { maxRealtimeSessions: 16, targetRealtimeSessions: 20 },
            expected: ["whisper-eks:targetRealtimeSessions = 20", "maxRealtimeSessions 16", "16 or less"],
        },
        { what: "a session idle timeout past what the ALB can hold", overrides: { realtimeIdleSeconds: 3601 }, expected: ["whisper-eks:realtimeIdleSeconds = 3601", "from 5 to 3600"] },
        { what: "a latency threshold the histogram cannot reach", overrides: { alertRealtimeTurnLatencyP95Ms: 60000 }, expected: ["whisper-eks:alertRealtimeTurnLatencyP95Ms = 60000", "from 100 to 20000"] },
        { what: "no live sessions at all", overrides: { maxRealtimeSessions: 0 }, expected: ["whisper-eks:maxRealtimeSessions = 0"] },
        {
            what: "more live sessions than a pod's memory holds beside one longest file",
            overrides: { maxRealtimeSessions: 2000 },
            expected: ["whisper-eks:maxRealtimeSessions = 2000", "realtimeMaxBufferedSeconds", "or less"],
        },
        // whisper-server refuses to start with a buffer no longer than a 30 s window: the pods would crash-loop.
        { what: "a live buffer shorter than a window", overrides: { realtimeMaxBufferedSeconds: 30 }, expected: ["whisper-eks:realtimeMaxBufferedSeconds = 30", "from 31 to 3600"] },
    ];
    for (const { what, overrides, expected } of refused) {
        it(`refuses ${what}, before declaring anything`, async function () {
            const evaluation = await tryEvaluateStack("prod", overrides);
            assert.ok(evaluation.error, "the evaluation fails");
            for (const text of expected) assert.ok(evaluation.error.message.includes(text), `message names ${text}:\n${evaluation.error.message}`);
            assert.equal(evaluation.resources.length, 0, "no resource was declared");
        });
    }
});
