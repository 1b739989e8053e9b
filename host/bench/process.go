package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ProcessStat is the memory of a watched process during a run.
type ProcessStat struct {
	PID  int    `json:"pid"`
	Name string `json:"name"`
	// PeakRSS is the largest resident set size sampled during the run
	// (every 100 ms), in bytes.
	PeakRSS int64 `json:"peak_rss_bytes"`
	// HighWaterRSS is the kernel's high-water mark (VmHWM) at the end of
	// the run: the peak over the process's whole life, start-up included.
	HighWaterRSS int64 `json:"high_water_rss_bytes"`
	// CPUSeconds is the CPU time (user + system) the process used during
	// the run, warm-up included.
	CPUSeconds float64 `json:"cpu_seconds"`
	// CPUPerCall is CPUSeconds over every call of the run (warm-up
	// included), in microseconds: what one call costs that process. It is
	// far steadier than throughput on a noisy machine.
	CPUPerCall float64 `json:"cpu_per_call_us"`
	// Error is set when the process could not be read (gone, no /proc).
	Error string `json:"error,omitempty"`
}

// readProcStatus reads the name, VmRSS and VmHWM of pid from /proc.
func readProcStatus(pid int) (name string, rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", 0, 0, fmt.Errorf("read memory of process %d: %w", pid, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Name":
			name = v
		case "VmRSS":
			rss = parseKB(v)
		case "VmHWM":
			hwm = parseKB(v)
		}
	}
	return name, rss, hwm, nil
}

// ResidentBytes is the resident set size (VmRSS) of process pid, in bytes.
func ResidentBytes(pid int) (int64, error) {
	_, rss, _, err := readProcStatus(pid)
	return rss, err
}

// parseKB parses "1234 kB" into bytes; 0 when malformed.
func parseKB(v string) int64 {
	n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(v, "kB")), 10, 64)
	if err != nil {
		return 0
	}
	return n << 10
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// readCPU reads the user + system CPU time of pid, in seconds.
func readCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read CPU time of process %d: %w", pid, err)
	}
	// The command name (field 2) may hold spaces: fields count from the
	// last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("process %d: malformed /proc stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("process %d: malformed /proc stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("process %d: malformed /proc stat", pid)
	}
	return float64(ut+st) / clockTicks, nil
}

// watcher samples the RSS of some processes until stopped.
type watcher struct {
	cpu0  []float64 // CPU time at the start, -1 when unreadable
	stats []ProcessStat
	mu    sync.Mutex
	done  chan struct{}
	wg    sync.WaitGroup
}

// watchInterval is how often resident memory is sampled.
const watchInterval = 100 * time.Millisecond

func startWatch(pids []int) *watcher {
	w := &watcher{done: make(chan struct{})}
	for _, pid := range pids {
		w.stats = append(w.stats, ProcessStat{PID: pid})
		c, err := readCPU(pid)
		if err != nil {
			c = -1
		}
		w.cpu0 = append(w.cpu0, c)
	}
	if len(pids) == 0 {
		return w
	}
	w.sample()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		t := time.NewTicker(watchInterval)
		defer t.Stop()
		for {
			select {
			case <-w.done:
				return
			case <-t.C:
				w.sample()
			}
		}
	}()
	return w
}

func (w *watcher) sample() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range w.stats {
		s := &w.stats[i]
		name, rss, hwm, err := readProcStatus(s.PID)
		if err != nil {
			if s.Error == "" {
				s.Error = err.Error()
			}
			continue
		}
		s.Name = name
		s.PeakRSS = max(s.PeakRSS, rss)
		s.HighWaterRSS = max(s.HighWaterRSS, hwm)
	}
}

// stop takes a last sample and returns the figures; calls is the number
// of calls the run made, warm-up included.
func (w *watcher) stop(calls int64) []ProcessStat {
	close(w.done)
	w.wg.Wait()
	if len(w.stats) == 0 {
		return nil
	}
	w.sample()
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range w.stats {
		s := &w.stats[i]
		c, err := readCPU(s.PID)
		if err != nil || w.cpu0[i] < 0 {
			continue
		}
		s.CPUSeconds = c - w.cpu0[i]
		if calls > 0 {
			s.CPUPerCall = s.CPUSeconds * 1e6 / float64(calls)
		}
	}
	return append([]ProcessStat(nil), w.stats...)
}
