// Package metricstest scrapes a Prometheus text endpoint and reads values
// out of it, for tests (unit, integration and e2e) that check counters
// after known traffic.
package metricstest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is a parsed scrape, by metric family name.
type Families map[string]*dto.MetricFamily

// Scrape GETs url (e.g. http://127.0.0.1:9464/metrics) in the classic text
// format and parses it with expfmt: a page that does not parse is an error.
func Scrape(ctx context.Context, url string) (Families, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, string(body), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	fams, err := Parse(string(body))
	return fams, string(body), err
}

// Parse parses the Prometheus text format.
func Parse(text string) (Families, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("metrics text does not parse: %w", err)
	}
	return fams, nil
}

// Value is the value of the counter, gauge or untyped sample of family
// name whose labels include every pair in labels (for a histogram, its
// sample count). ok is false when there is no such sample; with several,
// their sum is returned.
func (f Families) Value(name string, labels map[string]string) (v float64, ok bool) {
	fam, found := f[name]
	if !found {
		return 0, false
	}
	for _, m := range fam.GetMetric() {
		if !matches(m, labels) {
			continue
		}
		ok = true
		switch {
		case m.Counter != nil:
			v += m.GetCounter().GetValue()
		case m.Gauge != nil:
			v += m.GetGauge().GetValue()
		case m.Untyped != nil:
			v += m.GetUntyped().GetValue()
		case m.Histogram != nil:
			v += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return v, ok
}

// Labels lists the label sets of family name, one "k=v,k=v" string each,
// sorted: for error messages.
func (f Families) Labels(name string) []string {
	var out []string
	for _, m := range f[name].GetMetric() {
		var kv []string
		for _, l := range m.GetLabel() {
			kv = append(kv, l.GetName()+"="+l.GetValue())
		}
		out = append(out, strings.Join(kv, ","))
	}
	sort.Strings(out)
	return out
}

func matches(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}
