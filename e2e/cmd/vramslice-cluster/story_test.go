package main

import (
	"math"
	"testing"
	"time"

	"github.com/vramslice/vramslice/e2e/cluster"
)

func TestParseUsage(t *testing.T) {
	for text, want := range map[string]usageSpec{
		"0.3-0.7":   {0.3, 0.7},
		" 0.5 ":     {0.5, 0.5},
		"0-1.5":     {0, 1.5},
		"0.2 - 0.4": {0.2, 0.4},
	} {
		got, err := parseUsage(text)
		if err != nil || got != want {
			t.Errorf("parseUsage(%q) = %v, %v; want %v", text, got, err, want)
		}
	}
	for _, bad := range []string{"", "lots", "0.7-0.3", "-0.1", "0.1-3", "NaN", "0.1-0.2-0.3"} {
		if _, err := parseUsage(bad); err == nil {
			t.Errorf("parseUsage(%q) accepted", bad)
		}
	}
}

func TestUsageMovesBetweenLowAndHigh(t *testing.T) {
	u := usageSpec{0.2, 0.6}
	period := 10 * time.Second
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if got := u.at(0, period, 0); !near(got, 0.2) {
		t.Errorf("start = %v, want LOW", got)
	}
	if got := u.at(5*time.Second, period, 0); !near(got, 0.6) {
		t.Errorf("half period = %v, want HIGH", got)
	}
	if got := u.at(10*time.Second, period, 0); !near(got, 0.2) {
		t.Errorf("full period = %v, want LOW again", got)
	}
	if got := u.at(0, period, 0.5); !near(got, 0.6) {
		t.Errorf("phase 0.5 at start = %v, want HIGH", got)
	}
	for s := 0; s < 40; s++ {
		got := u.at(time.Duration(s)*time.Second/3, period, phaseOf("pod"))
		if got < 0.2-1e-9 || got > 0.6+1e-9 {
			t.Fatalf("at %ds: %v outside [LOW, HIGH]", s, got)
		}
	}
	if got := (usageSpec{0.4, 0.4}).at(3*time.Second, period, 0.3); got != 0.4 {
		t.Errorf("fixed share = %v", got)
	}
}

func TestCapToTotalDropsWhatDoesNotFit(t *testing.T) {
	procs := []cluster.FakeGPUProcess{{PID: 1, Used: "60"}, {PID: 2, Used: "50"}, {PID: 3, Used: "40"}}
	got := capToTotal(procs, "100")
	if len(got) != 2 || got[0].PID != 1 || got[1].PID != 3 {
		t.Fatalf("capToTotal kept %+v; want pids 1 and 3 (100 bytes total)", got)
	}
	if got := capToTotal(procs, "1Gi"); len(got) != 3 {
		t.Fatalf("all fit in 1Gi, kept %+v", got)
	}
}
