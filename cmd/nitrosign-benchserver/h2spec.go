package main

import (
	"bufio"
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode/utf8"
)

const h2specUsage = `Usage: nitrosign-benchserver h2spec-compare [flags]

Reads the JUnit reports (h2spec -j FILE) of two h2spec runs, one against a
baseline server and one against the server under test, and prints them side
by side: each test's id (as h2spec takes it on its command line, e.g.
http2/5.1/3), its result on both, and then every test that the server under
test fails while the baseline passes, with h2spec's message (taken from the
run's console output, --*-log, when given; else from the JUnit report).
Exits 1 when there is any such test, 0 otherwise. scripts/h2spec.sh runs it.

Examples:
  nitrosign-benchserver h2spec-compare --baseline grpc-go=out/grpc-go.xml --baseline-log out/grpc-go.txt \
      --target proxy=out/proxy.xml --target-log out/proxy.txt --markdown out/side-by-side.md
`

// h2specResult is one test's outcome.
type h2specResult string

const (
	h2Pass    h2specResult = "pass"
	h2Fail    h2specResult = "FAIL"
	h2Skip    h2specResult = "skip"
	h2Missing h2specResult = "absent"
)

// h2specCase is one test of an h2spec report.
type h2specCase struct {
	ID      string // e.g. http2/5.1/3: group id and 1-based index in it
	Section string // e.g. "5.1. Stream States"
	Desc    string
	Result  h2specResult
	Message string // h2spec's message for a failure
}

// h2specReport is one h2spec run, its tests in h2spec's order.
type h2specReport struct {
	Name  string
	Cases []*h2specCase
	byID  map[string]*h2specCase
}

func (r *h2specReport) count(res h2specResult) int {
	n := 0
	for _, c := range r.Cases {
		if c.Result == res {
			n++
		}
	}
	return n
}

// h2spec writes the text of <error> and <failure> verbatim (innerxml), so
// a frame's text could make the report malformed XML: escape it first.
var junitMessage = regexp.MustCompile(`(?s)(<(error|failure)>)(.*?)(</(?:error|failure)>)`)

func escapeJUnitMessages(b []byte) []byte {
	return junitMessage.ReplaceAllFunc(b, func(m []byte) []byte {
		sub := junitMessage.FindSubmatch(m)
		var esc bytes.Buffer
		esc.Write(sub[1])
		clean := strings.Map(func(r rune) rune {
			if r == '\n' || r == '\t' || (r >= 0x20 && r != utf8.RuneError && r != 0x7f) {
				return r
			}
			return '?'
		}, string(sub[3]))
		_ = xml.EscapeText(&esc, []byte(clean))
		esc.Write(sub[4])
		return esc.Bytes()
	})
}

// parseH2specJUnit reads an h2spec JUnit report.
func parseH2specJUnit(name string, b []byte) (*h2specReport, error) {
	var doc struct {
		Suites []struct {
			Name    string `xml:"name,attr"`
			Package string `xml:"package,attr"`
			Cases   []struct {
				Desc    string  `xml:"classname,attr"`
				Failure *string `xml:"failure"`
				Error   *string `xml:"error"`
				Skipped *string `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(escapeJUnitMessages(b), &doc); err != nil {
		return nil, fmt.Errorf("%s: not an h2spec JUnit report: %w", name, err)
	}
	r := &h2specReport{Name: name, byID: map[string]*h2specCase{}}
	for _, s := range doc.Suites {
		for i, tc := range s.Cases {
			c := &h2specCase{ID: s.Package + "/" + strconv.Itoa(i+1), Section: s.Name, Desc: tc.Desc, Result: h2Pass}
			switch {
			case tc.Skipped != nil:
				c.Result = h2Skip
			case tc.Failure != nil:
				c.Result, c.Message = h2Fail, strings.TrimSpace(*tc.Failure)
			case tc.Error != nil:
				// Error() of h2spec's TestError: the expected lines, then
				// the actual one.
				c.Result = h2Fail
				lines := strings.Split(strings.TrimSpace(*tc.Error), "\n")
				if len(lines) > 1 {
					c.Message = "Expected: " + strings.Join(lines[:len(lines)-1], "\n          ") + "\n  Actual: " + lines[len(lines)-1]
				} else {
					c.Message = lines[0]
				}
			}
			if r.byID[c.ID] != nil {
				return nil, fmt.Errorf("%s: test %s appears twice", name, c.ID)
			}
			r.byID[c.ID] = c
			r.Cases = append(r.Cases, c)
		}
	}
	if len(r.Cases) == 0 {
		return nil, fmt.Errorf("%s: the report has no test", name)
	}
	return r, nil
}

var (
	h2specSectionLine = regexp.MustCompile(`^\s+(\d+(?:\.\d+)*\. .*)$`)
	h2specFailLine    = regexp.MustCompile(`^(\s*)× (\d+): (.*)$`)
)

// addH2specMessages takes the failure messages from h2spec's console output
// (its "Failures:" part), which also says which requirement failed (the
// "-> The endpoint MUST ..." line); they replace those from the report.
func addH2specMessages(r *h2specReport, log io.Reader) error {
	type key struct{ section, index, desc string }
	msgs := map[key]string{}
	sc := bufio.NewScanner(log)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	inFailures := false
	var section string
	var cur *key
	var indent int
	var body []string
	flush := func() {
		if cur != nil {
			msgs[*cur] = strings.Join(body, "\n")
		}
		cur, body = nil, nil
	}
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), " \r")
		if !inFailures {
			inFailures = line == "Failures:"
			continue
		}
		if strings.HasPrefix(line, "Finished in ") {
			break
		}
		if m := h2specFailLine.FindStringSubmatch(line); m != nil {
			flush()
			cur = &key{section, m[2], m[3]}
			indent = -1
			continue
		}
		if cur != nil && line != "" && len(line)-len(strings.TrimLeft(line, " ")) > 0 && !h2specSectionLine.MatchString(line) {
			ws := len(line) - len(strings.TrimLeft(line, " "))
			if indent < 0 {
				indent = ws
			}
			body = append(body, line[min(ws, indent):])
			continue
		}
		flush()
		if m := h2specSectionLine.FindStringSubmatch(line); m != nil {
			section = m[1]
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return err
	}
	for _, c := range r.Cases {
		i := c.ID[strings.LastIndexByte(c.ID, '/')+1:]
		if m, ok := msgs[key{c.Section, i, c.Desc}]; ok && c.Result == h2Fail {
			c.Message = m
		}
	}
	return nil
}

// h2specSide is one side of the comparison: NAME=JUNIT.xml.
type h2specSide struct{ name, file string }

func (s *h2specSide) String() string { return s.name + "=" + s.file }

func (s *h2specSide) Set(v string) error {
	name, file, ok := strings.Cut(v, "=")
	if !ok || name == "" || file == "" {
		return errors.New("want NAME=JUNIT.xml, e.g. proxy=out/proxy.xml")
	}
	s.name, s.file = name, file
	return nil
}

func loadH2specReport(side h2specSide, logFile string) (*h2specReport, error) {
	b, err := os.ReadFile(side.file)
	if err != nil {
		return nil, err
	}
	r, err := parseH2specJUnit(side.name, b)
	if err != nil {
		return nil, err
	}
	if logFile != "" {
		f, err := os.Open(logFile)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if err := addH2specMessages(r, f); err != nil {
			return nil, fmt.Errorf("%s: %w", logFile, err)
		}
	}
	return r, nil
}

// h2specRow is one test, side by side.
type h2specRow struct {
	c          *h2specCase // from whichever report has it
	base, tgt  h2specResult
	regression bool // the target fails (or lacks) a test the baseline passes
	tgtMessage string
}

func compareH2spec(base, tgt *h2specReport) []h2specRow {
	var rows []h2specRow
	seen := map[string]bool{}
	add := func(c *h2specCase) {
		if seen[c.ID] {
			return
		}
		seen[c.ID] = true
		row := h2specRow{c: c, base: h2Missing, tgt: h2Missing}
		if b := base.byID[c.ID]; b != nil {
			row.base = b.Result
		}
		if t := tgt.byID[c.ID]; t != nil {
			row.tgt, row.tgtMessage = t.Result, t.Message
		}
		row.regression = row.base == h2Pass && (row.tgt == h2Fail || row.tgt == h2Missing)
		rows = append(rows, row)
	}
	for _, c := range base.Cases {
		add(c)
	}
	for _, c := range tgt.Cases {
		add(c)
	}
	return rows
}

func h2specTotals(r *h2specReport) string {
	return fmt.Sprintf("%d tests, %d passed, %d failed, %d skipped", len(r.Cases), r.count(h2Pass), r.count(h2Fail), r.count(h2Skip))
}

func writeH2specText(w io.Writer, base, tgt *h2specReport, rows []h2specRow) error {
	var b strings.Builder
	fmt.Fprintf(&b, "h2spec side by side\n  %s: %s\n  %s: %s\n\n", base.Name, h2specTotals(base), tgt.Name, h2specTotals(tgt))
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "id\t%s\t%s\t\ttest\n", base.Name, tgt.Name)
	for _, r := range rows {
		mark := ""
		switch {
		case r.regression:
			mark = "<<"
		case r.base == h2Fail && r.tgt == h2Pass:
			mark = "+"
		case r.base != r.tgt:
			mark = "~"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.c.ID, r.base, r.tgt, mark, r.c.Desc)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var reg, better, differ int
	for _, r := range rows {
		switch {
		case r.regression:
			reg++
		case r.base == h2Fail && r.tgt == h2Pass:
			better++
		case r.base != r.tgt:
			differ++
		}
	}
	fmt.Fprintf(&b, "\n<< %s fails, %s passes: %d;  + %s passes, %s fails: %d;  ~ other differences: %d\n",
		tgt.Name, base.Name, reg, tgt.Name, base.Name, better, differ)
	if reg > 0 {
		fmt.Fprintf(&b, "\n%s FAILS these %d tests that %s passes:\n", tgt.Name, reg, base.Name)
		for _, r := range rows {
			if r.regression {
				fmt.Fprintf(&b, "\n  %s  [%s]  %s\n", r.c.ID, r.c.Section, r.c.Desc)
				msg := r.tgtMessage
				if r.tgt == h2Missing {
					msg = "not in " + tgt.Name + "'s report"
				}
				for l := range strings.SplitSeq(msg, "\n") {
					fmt.Fprintf(&b, "      %s\n", l)
				}
			}
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeH2specMarkdown(w io.Writer, base, tgt *h2specReport, rows []h2specRow) error {
	var b strings.Builder
	fmt.Fprintf(&b, "- %s: %s\n- %s: %s\n\n", base.Name, h2specTotals(base), tgt.Name, h2specTotals(tgt))
	fmt.Fprintf(&b, "| id | section | test | %s | %s |\n|---|---|---|---|---|\n", base.Name, tgt.Name)
	esc := strings.NewReplacer("|", `\|`, "\n", " ")
	for _, r := range rows {
		t := string(r.tgt)
		if r.regression {
			t = "**" + t + "** (defect)"
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s |\n", r.c.ID, esc.Replace(r.c.Section), esc.Replace(r.c.Desc), r.base, t)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func runH2specCompare(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("h2spec-compare", h2specUsage, stderr)
	var base, tgt h2specSide
	fs.Var(&base, "baseline", "the baseline's `NAME=JUNIT.xml` (h2spec -j)")
	fs.Var(&tgt, "target", "the tested server's `NAME=JUNIT.xml` (h2spec -j)")
	baseLog := fs.String("baseline-log", "", "h2spec's console output of the baseline run (`FILE`), for its messages")
	tgtLog := fs.String("target-log", "", "h2spec's console output of the tested run (`FILE`), for its messages")
	md := fs.String("markdown", "", "also write the side-by-side table as Markdown to `FILE`")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if base.file == "" || tgt.file == "" {
		return usageErr(stderr, fs.Name(), "--baseline and --target are required (see -h)")
	}
	if base.name == tgt.name {
		return usageErr(stderr, fs.Name(), "--baseline and --target have the same name %q", base.name)
	}
	br, err := loadH2specReport(base, *baseLog)
	if err != nil {
		return err
	}
	tr, err := loadH2specReport(tgt, *tgtLog)
	if err != nil {
		return err
	}
	rows := compareH2spec(br, tr)
	if err := writeH2specText(stdout, br, tr, rows); err != nil {
		return err
	}
	if *md != "" {
		var b bytes.Buffer
		if err := writeH2specMarkdown(&b, br, tr, rows); err != nil {
			return err
		}
		if err := os.WriteFile(*md, b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write --markdown file: %w", err)
		}
	}
	n := 0
	for _, r := range rows {
		if r.regression {
			n++
		}
	}
	if n > 0 {
		return fmt.Errorf("%s fails %d test%s that %s passes", tr.Name, n, plural(n), br.Name)
	}
	return nil
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
