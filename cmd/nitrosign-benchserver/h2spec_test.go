package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Two h2spec JUnit reports in h2spec's own layout (its messages verbatim,
// not escaped: note the "<" in one of them) and one console output.
const (
	h2specBaseline = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="1. Starting HTTP/2" package="generic/1" id="1" tests="1" skipped="0" failures="0" errors="0">
    <testcase package="generic/1" classname="Sends a client connection preface" time="0.0004"></testcase>
  </testsuite>
  <testsuite name="5.1. Stream States" package="http2/5.1" id="5.1" tests="3" skipped="0" failures="0" errors="1">
    <testcase package="http2/5.1" classname="idle: Sends a DATA frame" time="2.0">
      <error>GOAWAY Frame (Error Code: PROTOCOL_ERROR)
Connection closed
Timeout</error>
    </testcase>
    <testcase package="http2/5.1" classname="half closed (remote): Sends a HEADERS frame" time="0.001"></testcase>
    <testcase package="http2/5.1" classname="closed: Sends a HEADERS frame" time="0.001"></testcase>
  </testsuite>
  <testsuite name="6.5.3. Settings Synchronization" package="http2/6.5.3" id="6.5.3" tests="1" skipped="1" failures="0" errors="0">
    <testcase package="http2/6.5.3" classname="Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE" time="0.0012">
      <skipped></skipped>
    </testcase>
  </testsuite>
</testsuites>`
	h2specTarget = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="1. Starting HTTP/2" package="generic/1" id="1" tests="1" skipped="0" failures="0" errors="0">
    <testcase package="generic/1" classname="Sends a client connection preface" time="0.0004"></testcase>
  </testsuite>
  <testsuite name="5.1. Stream States" package="http2/5.1" id="5.1" tests="3" skipped="0" failures="0" errors="2">
    <testcase package="http2/5.1" classname="idle: Sends a DATA frame" time="0.001"></testcase>
    <testcase package="http2/5.1" classname="half closed (remote): Sends a HEADERS frame" time="0.001">
      <error>GOAWAY Frame (Error Code: STREAM_CLOSED)
RST_STREAM Frame (Error Code: STREAM_CLOSED)
Connection closed
HEADERS Frame (length:69, flags:0x05, stream_id:1)</error>
    </testcase>
    <testcase package="http2/5.1" classname="closed: Sends a HEADERS frame" time="2.0">
      <error>GOAWAY Frame (Error Code: STREAM_CLOSED)
Connection closed
DATA Frame <&> (length:1)</error>
    </testcase>
  </testsuite>
  <testsuite name="6.5.3. Settings Synchronization" package="http2/6.5.3" id="6.5.3" tests="1" skipped="1" failures="0" errors="0">
    <testcase package="http2/6.5.3" classname="Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE" time="0.0012">
      <skipped></skipped>
    </testcase>
  </testsuite>
</testsuites>`
	h2specTargetLog = "Hypertext Transfer Protocol Version 2 (HTTP/2)\n" +
		"  5. Streams and Multiplexing\n" +
		"    5.1. Stream States\n" +
		"        2: half closed (remote): Sends a HEADERS frame\r      × 2: half closed (remote): Sends a HEADERS frame\n" +
		"\n" +
		"Failures: \n" +
		"\n" +
		"Hypertext Transfer Protocol Version 2 (HTTP/2)\n" +
		"  5. Streams and Multiplexing\n" +
		"    5.1. Stream States\n" +
		"      × 2: half closed (remote): Sends a HEADERS frame\n" +
		"        -> The endpoint MUST respond with a stream error of type STREAM_CLOSED.\n" +
		"           Expected: GOAWAY Frame (Error Code: STREAM_CLOSED)\n" +
		"                     RST_STREAM Frame (Error Code: STREAM_CLOSED)\n" +
		"                     Connection closed\n" +
		"             Actual: HEADERS Frame (length:69, flags:0x05, stream_id:1)\n" +
		"\n" +
		"Finished in 2.1 seconds\n" +
		"5 tests, 2 passed, 1 skipped, 2 failed\n"
)

func TestH2specCompare(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	base, tgt, log := write("g.xml", h2specBaseline), write("p.xml", h2specTarget), write("p.txt", h2specTargetLog)
	md := filepath.Join(dir, "sbs.md")
	code, stdout, stderr := runArgs(t, "h2spec-compare", "--baseline", "grpc-go="+base, "--target", "proxy="+tgt,
		"--target-log", log, "--markdown", md)
	if code != 1 || !strings.Contains(stderr, "proxy fails 2 tests that grpc-go passes") {
		t.Fatalf("exit %d, stderr %q; want 1 and the count", code, stderr)
	}
	for _, want := range []string{
		"grpc-go: 5 tests, 3 passed, 1 failed, 1 skipped",
		"proxy: 5 tests, 2 passed, 2 failed, 1 skipped",
		"generic/1/1    pass     pass       Sends a client connection preface",
		"http2/5.1/1    FAIL     pass   +   idle: Sends a DATA frame",
		"http2/5.1/2    pass     FAIL   <<  half closed (remote): Sends a HEADERS frame",
		"http2/6.5.3/1  skip     skip       Sends multiple",
		"<< proxy fails, grpc-go passes: 2;  + proxy passes, grpc-go fails: 1;  ~ other differences: 0",
		"proxy FAILS these 2 tests that grpc-go passes:",
		// From the console output, with the requirement.
		"-> The endpoint MUST respond with a stream error of type STREAM_CLOSED.\n" +
			"         Expected: GOAWAY Frame (Error Code: STREAM_CLOSED)\n" +
			"                   RST_STREAM Frame (Error Code: STREAM_CLOSED)",
		// From the JUnit report, unescaped there.
		"http2/5.1/3  [5.1. Stream States]  closed: Sends a HEADERS frame\n" +
			"      Expected: GOAWAY Frame (Error Code: STREAM_CLOSED)\n" +
			"                Connection closed\n" +
			"        Actual: DATA Frame <&> (length:1)",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout)
		}
	}
	b, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "| `http2/5.1/2` | 5.1. Stream States | half closed (remote): Sends a HEADERS frame | pass | **FAIL** (defect) |") {
		t.Errorf("markdown:\n%s", b)
	}

	// The same report on both sides: nothing to report, exit 0.
	code, stdout, stderr = runArgs(t, "h2spec-compare", "--baseline", "a="+tgt, "--target", "b="+tgt)
	if code != 0 || !strings.Contains(stdout, "<< b fails, a passes: 0") {
		t.Fatalf("exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	// A report the target's run did not write counts its tests as absent.
	short := write("short.xml", strings.Replace(h2specBaseline, `<testcase package="generic/1" classname="Sends a client connection preface" time="0.0004"></testcase>`, "", 1))
	code, stdout, _ = runArgs(t, "h2spec-compare", "--baseline", "a="+base, "--target", "b="+short)
	if code != 1 || !strings.Contains(stdout, "generic/1/1    pass  absent  <<  Sends a client connection preface") {
		t.Fatalf("exit %d, stdout:\n%s", code, stdout)
	}
}

func TestH2specCompareUsage(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.xml")
	if err := os.WriteFile(bad, []byte("<html>"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"h2spec-compare", "-h"}, 0, "Reads the JUnit reports"},
		{[]string{"h2spec-compare"}, 2, "required"},
		{[]string{"h2spec-compare", "--baseline", "x.xml"}, 2, "NAME=JUNIT.xml"},
		{[]string{"h2spec-compare", "--baseline", "a=" + bad, "--target", "a=" + bad}, 2, "same name"},
		{[]string{"h2spec-compare", "--baseline", "a=" + bad, "--target", "b=" + bad}, 1, "not an h2spec JUnit report"},
		{[]string{"h2spec-compare", "--baseline", "a=" + filepath.Join(dir, "none.xml"), "--target", "b=" + bad}, 1, "no such file"},
	} {
		code, _, stderr := runArgs(t, tt.args...)
		if code != tt.code || !strings.Contains(stderr, tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d saying %q", tt.args, code, stderr, tt.code, tt.want)
		}
	}
}
