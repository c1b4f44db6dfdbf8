package main

// Figures a run prints besides its rate: the extender's own latency histograms
// and counters (from its /metrics), kube-scheduler's attempt and queue counters
// (from the in-process scheduler's registry) and CPU seconds per component.

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"k8s.io/component-base/metrics/legacyregistry"
)

// series maps `name{labels}` (labels as printed) to a sample value.
type series map[string]float64

// scrapeText reads a Prometheus/OpenMetrics text page into series.
func scrapeText(r io.Reader) (series, error) {
	out := series{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cut := strings.LastIndexByte(line, ' ')
		if cut < 0 {
			return nil, fmt.Errorf("metrics line without a value: %q", line)
		}
		v, err := strconv.ParseFloat(line[cut+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", line, err)
		}
		out[line[:cut]] = v
	}
	return out, sc.Err()
}

func scrapeURL(url string) (series, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return scrapeText(resp.Body)
}

// schedulerSeries gathers kube-scheduler's counters and histograms (most series carry
// a profile label) and the in-process API server's request counts: from this
// process's registry, and from each scheduler process's metrics page in urls.
func schedulerSeries(urls []string) (series, error) {
	families, err := legacyregistry.DefaultGatherer.Gather()
	if err != nil {
		return nil, err
	}
	out := series{}
	for _, f := range families {
		name := f.GetName()
		if !strings.HasPrefix(name, "scheduler_") && !apiServerSeries[name] {
			continue
		}
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			key := name + "{" + strings.Join(labels, ",") + "}"
			switch {
			case m.Counter != nil:
				out[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[key] = m.Gauge.GetValue()
			case m.Histogram != nil:
				out[name+"_count{"+strings.Join(labels, ",")+"}"] = float64(m.Histogram.GetSampleCount())
				out[name+"_sum{"+strings.Join(labels, ",")+"}"] = m.Histogram.GetSampleSum()
				for _, b := range m.Histogram.GetBucket() {
					bl := append(append([]string(nil), labels...), fmt.Sprintf("le=%q", strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64)))
					out[name+"_bucket{"+strings.Join(bl, ",")+"}"] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	for _, url := range urls {
		page, err := scrapeURL(url)
		if err != nil {
			return nil, fmt.Errorf("kube-scheduler metrics: %w", err)
		}
		for k, v := range page {
			if strings.HasPrefix(k, "scheduler_") {
				out[k] += v
			}
		}
	}
	return out, nil
}

// apiServerSeries are the in-process API server's series the report reads: requests by
// verb, their server-side latency, and API Priority and Fairness's queue wait by level.
var apiServerSeries = map[string]bool{
	"apiserver_request_total":                             true,
	"apiserver_request_duration_seconds":                  true,
	"apiserver_flowcontrol_request_wait_duration_seconds": true,
}

// apfWaits summarises API Priority and Fairness's queue wait per priority level (requests
// counted, p50, p99), busiest level first.
func apfWaits(s series) string {
	const name = "apiserver_flowcontrol_request_wait_duration_seconds"
	counts := map[string]float64{}
	for k, v := range s {
		if !strings.HasPrefix(k, name+"_count{") || v == 0 {
			continue
		}
		i := strings.Index(k, `priority_level="`)
		if i < 0 {
			continue
		}
		rest := k[i+len(`priority_level="`):]
		counts[rest[:strings.IndexByte(rest, '"')]] += v
	}
	levels := make([]string, 0, len(counts))
	for l := range counts {
		levels = append(levels, l)
	}
	sort.Slice(levels, func(i, j int) bool { return counts[levels[i]] > counts[levels[j]] })
	parts := make([]string, 0, len(levels))
	for _, l := range levels {
		pl := fmt.Sprintf("priority_level=%q", l)
		parts = append(parts, fmt.Sprintf("%s %.0f requests p50 %s p99 %s", l, counts[l],
			ms(s.quantile(name, 0.5, pl)), ms(s.quantile(name, 0.99, pl))))
	}
	if len(parts) == 0 {
		return "none recorded"
	}
	return strings.Join(parts, "; ")
}

// delta is after minus before, per series.
func delta(before, after series) series {
	out := series{}
	for k, v := range after {
		out[k] = v - before[k]
	}
	return out
}

// sum adds every series of `name` whose labels contain all of `want`.
func (s series) sum(name string, want ...string) float64 {
	total := 0.0
	for k, v := range s {
		if !strings.HasPrefix(k, name+"{") && k != name {
			continue
		}
		ok := true
		for _, w := range want {
			if !strings.Contains(k, w) {
				ok = false
				break
			}
		}
		if ok {
			total += v
		}
	}
	return total
}

// quantile estimates q of histogram `name` (series name without _bucket) over the
// series whose labels contain `want`, interpolating linearly inside a bucket as
// Prometheus' histogram_quantile does. NaN when there are no samples.
func (s series) quantile(name string, q float64, want ...string) float64 {
	type bucket struct{ le, count float64 }
	byLe := map[float64]float64{}
	for k, v := range s {
		if !strings.HasPrefix(k, name+"_bucket{") {
			continue
		}
		ok := true
		for _, w := range want {
			if !strings.Contains(k, w) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		// The bucket bound is the last label (`profile="..."` also ends in le=").
		i := strings.LastIndex(k, `le="`)
		if i < 0 {
			continue
		}
		rest := k[i+4:]
		le, err := strconv.ParseFloat(rest[:strings.IndexByte(rest, '"')], 64)
		if err != nil {
			continue
		}
		byLe[le] += v
	}
	var buckets []bucket
	for le, c := range byLe {
		buckets = append(buckets, bucket{le, c})
	}
	sort.Slice(buckets, func(i, j int) bool { return buckets[i].le < buckets[j].le })
	if len(buckets) == 0 || buckets[len(buckets)-1].count == 0 {
		return math.NaN()
	}
	rank := q * buckets[len(buckets)-1].count
	lower, below := 0.0, 0.0
	for _, b := range buckets {
		if b.count >= rank {
			if math.IsInf(b.le, 1) {
				return lower
			}
			if b.count == below {
				return b.le
			}
			return lower + (b.le-lower)*(rank-below)/(b.count-below)
		}
		lower, below = b.le, b.count
	}
	return lower
}

func ms(seconds float64) string {
	if math.IsNaN(seconds) {
		return "-"
	}
	return fmt.Sprintf("%.2fms", seconds*1000)
}

// cpuSeconds is the user+system CPU time of a process so far (0 when unreadable).
func cpuSeconds(pid int) float64 {
	path := "/proc/self/stat"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/stat", pid)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) start after the last ')'.
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	if len(fields) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ is 100 on Linux
}

// componentPids are the processes whose CPU a run reports besides the bench's own.
type componentPids struct {
	extender   int
	plugins    []int
	schedulers []int
}

// cpuSample is CPU seconds per component at one moment.
type cpuSample struct {
	at                                 time.Time
	bench, extender, plugin, scheduler float64
}

func sampleCPU(pids componentPids) cpuSample {
	s := cpuSample{at: time.Now(), bench: cpuSeconds(0), extender: cpuSeconds(pids.extender)}
	for _, p := range pids.plugins {
		s.plugin += cpuSeconds(p)
	}
	for _, p := range pids.schedulers {
		s.scheduler += cpuSeconds(p)
	}
	return s
}

// report prints what one run cost, from the snapshots before and after it.
func report(profile string, pods int, ext, sched series, cpu0, cpu1 cpuSample) {
	wall := cpu1.at.Sub(cpu0.at).Seconds()
	bench, extender, plugins := cpu1.bench-cpu0.bench, cpu1.extender-cpu0.extender, cpu1.plugin-cpu0.plugin
	schedulers := cpu1.scheduler - cpu0.scheduler
	fmt.Printf("  CPU to all bound, %.1fs: bench process (etcd, apiserver, hollow nodes, in-process schedulers) %.1fs, kube-scheduler processes %.1fs, extender %.1fs, device plugins %.1fs (2 cores = %.1fs available)\n",
		wall, bench, schedulers, extender, plugins, 2*wall)
	perPod := func(s float64) float64 { return s / float64(pods) * 1e3 }
	fmt.Printf("  CPU per pod bound: %.2f ms (bench process %.2f, kube-scheduler processes %.2f, extender %.2f, device plugins %.2f)\n",
		perPod(bench+schedulers+extender+plugins), perPod(bench), perPod(schedulers), perPod(extender), perPod(plugins))
	p := fmt.Sprintf("profile=%q", profile)
	fmt.Printf("  kube-scheduler: attempts scheduled %.0f, unschedulable %.0f, error %.0f; attempt p50 %s p99 %s; pods re-queued: backoff %.0f, unschedulable %.0f\n",
		sched.sum("scheduler_schedule_attempts_total", p, `result="scheduled"`),
		sched.sum("scheduler_schedule_attempts_total", p, `result="unschedulable"`),
		sched.sum("scheduler_schedule_attempts_total", p, `result="error"`),
		ms(sched.quantile("scheduler_scheduling_attempt_duration_seconds", 0.5, p, `result="scheduled"`)),
		ms(sched.quantile("scheduler_scheduling_attempt_duration_seconds", 0.99, p, `result="scheduled"`)),
		sched.sum("scheduler_queue_incoming_pods_total", `queue="backoff"`),
		sched.sum("scheduler_queue_incoming_pods_total", `queue="unschedulable"`))
	for _, point := range []string{"Filter", "Score"} {
		pt := fmt.Sprintf("extension_point=%q", point)
		fmt.Printf("  kube-scheduler %-6s extension point p50 %s p99 %s\n", point,
			ms(sched.quantile("scheduler_framework_extension_point_duration_seconds", 0.5, p, pt)),
			ms(sched.quantile("scheduler_framework_extension_point_duration_seconds", 0.99, p, pt)))
	}
	// The scheduling cycle is serial: its length (extender calls included) bounds the rate
	// at which one scheduler can place pods, whatever CPU is left.
	fmt.Printf("  kube-scheduler scheduling algorithm (filter + score, extender calls included) p50 %s p99 %s; cycles %.0f in the run\n",
		ms(sched.quantile("scheduler_scheduling_algorithm_duration_seconds", 0.5)),
		ms(sched.quantile("scheduler_scheduling_algorithm_duration_seconds", 0.99)),
		sched.sum("scheduler_scheduling_algorithm_duration_seconds_count"))
	fmt.Printf("  API requests: %s\n", apiRequests(sched, 8))
	// Where a bind waits: the API server's own time for the Binding POST (APF queue, admission,
	// etcd), against the binder's round trip (the extender's bind histogram below).
	binding := []string{`verb="POST"`, `resource="pods"`, `subresource="binding"`}
	fmt.Printf("  API server POST pods/binding (its own time): p50 %s p99 %s; APF queue wait: %s\n",
		ms(sched.quantile("apiserver_request_duration_seconds", 0.5, binding...)),
		ms(sched.quantile("apiserver_request_duration_seconds", 0.99, binding...)),
		apfWaits(sched))
	if ext == nil {
		return
	}
	for _, verb := range []string{"filter", "prioritize", "bind"} {
		v := fmt.Sprintf("verb=%q", verb)
		fmt.Printf("  extender %-10s calls %5.0f  p50 %s  p99 %s  (its own histogram)\n", verb,
			ext.sum("vramslice_extender_request_duration_seconds_count", v),
			ms(ext.quantile("vramslice_extender_request_duration_seconds", 0.5, v)),
			ms(ext.quantile("vramslice_extender_request_duration_seconds", 0.99, v)))
	}
	fmt.Printf("  extender bind conflicts %.0f, bind errors %.0f\n",
		ext.sum("vramslice_extender_bind_conflicts_total"),
		ext.sum("vramslice_extender_decisions_total", `verb="bind"`, `outcome="error"`))
}

// apiRequests summarises apiserver_request_total: the total and the `top` busiest
// verb/resource(/subresource) pairs (watches count once, when opened).
func apiRequests(s series, top int) string {
	label := func(key, name string) string {
		i := strings.Index(key, name+`="`)
		if i < 0 {
			return ""
		}
		rest := key[i+len(name)+2:]
		return rest[:strings.IndexByte(rest, '"')]
	}
	counts := map[string]float64{}
	total := 0.0
	for k, v := range s {
		if !strings.HasPrefix(k, "apiserver_request_total{") || v == 0 {
			continue
		}
		what := label(k, "verb") + " " + label(k, "resource")
		if sub := label(k, "subresource"); sub != "" {
			what += "/" + sub
		}
		counts[what] += v
		total += v
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return counts[keys[i]] > counts[keys[j]] })
	if len(keys) > top {
		keys = keys[:top]
	}
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %.0f", k, counts[k])
	}
	return fmt.Sprintf("%.0f in all; %s", total, strings.Join(parts, ", "))
}
