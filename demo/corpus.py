"""Synthetic maintenance reports and alarm texts for the demo fault-report classifier.

Each class has many templates (alarm codes, operator free text, shift-log notes, technician
and work-order reports) whose slots are filled from shared pools (assets, sides, numbers with
units) and class symptom pools. Reports describe symptoms rather than class names, and many
mention words of other classes ("temperature normal", "no leak found", "re-greased").

Every fourth template (7 of 30 per class) and every fourth symptom phrase is held out: the
``train`` and ``calib`` splits never use them, the ``test`` split uses only the held-out templates
(with the full phrase pools), so test accuracy measures generalisation to unseen wording.
"""

from __future__ import annotations

import random
import re
from typing import Callable

LABELS: list[str] = [
    "bearing_wear",
    "overheating",
    "lubrication",
    "misalignment",
    "electrical_fault",
    "sensor_failure",
    "leak",
    "normal",
]
SPLITS: tuple[str, ...] = ("train", "calib", "test")
HOLD_OUT_EVERY = 4  # items i with i % 4 == 3 are held out for the test split

TEMPLATES: dict[str, tuple[str, ...]] = {
    "bearing_wear": (
        "ALM {alm} {tag} {side_code} BRG VIB HIGH {vib_hi}",
        "{asset}: {brg}. Trend rising over the last {n_weeks} weeks.",
        "Operator reports {brg} on {asset}, worse under load",
        "Shift log {shift}: {asset} noisy, {brg}. Tech informed",
        "Vib route {date}: {tag} {side_code} velocity {vib_hi}, {brg}. Recommend bearing change at next stop",
        "WO {wo} - {asset} - replace {side_code} bearing, {brg}",
        "CM finding on {tag}: {brg}; bearing {brg_model} close to end of life",
        "heard {brg_noise} near {tag}, temperature normal, no leaks",
        "{tech}: stethoscope check on {asset} {side_code} - {brg}. Lubrication done last week, not the cause",
        "bearing {brg_model} on {asset} {side}: {brg}, spare ordered",
        "{tag} {side_code} envelope {g_env} gE, defect frequency matches BPFO, stage 3 damage",
        "Online monitoring alert {asset}: {brg}",
        "{asset} sounds like gravel in the bearing, {brg}",
        "after re-greasing the noise at {side} is still there, {brg}",
        "rough rotation when turning {tag} shaft by hand, {brg}",
        "{asset} {side} housing at {temp_mild}, {brg}",
        "inspection {date}: {brg}; shaft and coupling alignment OK",
        "{tag}: seal replaced last month, now {brg}",
        "Oil analysis {tag}: iron particles {ppm} ppm, PQ index high, {brg}",
        "pls check {asset}, {brg_noise} since {time}",
        "{date} vib survey {asset}: {brg}, overall {vib_hi}",
        "Maintenance request: {asset} {brg_noise} from the {side} bearing, getting worse",
        "BRG DEFECT {tag} {side_code} ENV {g_env} gE",
        "{asset} - {brg}. Oil level OK, no leaks, alignment checked last month",
        "Handover note: keep an eye on {tag}, {brg}",
        "{tech}: nothing replaced yet, {brg} on {asset}, change-out planned {date}",
        "{tag} {side} bearing temperature {temp_mild} and {brg}",
        "{asset}: bearing getting loud, {brg}",
        "{asset} no leaks and temp fine, but {brg}",
        "{tech}: grease OK, {brg_noise} on {tag} persists",
    ),
    "overheating": (
        "ALM {alm} {tag} TEMP HH {temp_hi}",
        "{asset}: {hot}.",
        "HI TEMP ALARM {tag} {side_code} {temp_hi}",
        "Operator: {asset} {hot}, load reduced to {pct}%",
        "Shift log {shift}: {tag} {hot}. Cooling checked",
        "IR survey {date}: {asset} {hot}, delta {dt} K vs sister unit",
        "{tech}: {asset} at {temp_hi}, oil level OK and grease fresh, cause is {hot_cause}",
        "{asset} ran hot overnight, {hot}; bearings sound fine, no vibration change",
        "high temp trip on {tag} at {time}; {hot}",
        "{tag} oil sump at {temp_hi}, {hot_cause}",
        "unit {tag} getting hot, no leak, no noise, just heat. {hot}",
        "thermography {tag}: {hot}",
        "{tag} temperature alarm {temp_hi}, probably lack of grease, {hot}",
        "{asset} discharge temp trip {temp_hi}, {hot_cause}",
        "{asset} smells hot, frame at {temp_hi}",
        "TEMP {tag} {temp_hi} above limit, running at reduced speed",
        "customer call: {tag} keeps shutting down on high temperature, {hot}",
        "the {asset} is hot again, {hot}",
        "{tag} thermal protection tripped twice today, {hot_cause}",
        "WO {wo}: clean cooling on {asset}, {hot}",
        "{asset} temperature {temp_hi} and rising, {hot_cause}",
        "Handover note: {tag} running hot, {hot}",
        "OVERTEMP {tag} {side_code} {temp_hi}",
        "{tech}: {hot} on {asset}; vibration and noise normal",
        "Maintenance request: {asset} overheats in the afternoon, {hot_cause}",
        "{asset} - {hot}. lube checked, fine",
        "{asset}: {hot}; no abnormal noise, no leaks",
        "{tag} hot, {hot}",
        "{asset} temp {temp_hi} after relubrication, {hot_cause}",
        "{tech}: {hot} at {tag}, electrical checks OK",
    ),
    "lubrication": (
        "ALM {alm} {tag} LUBE OIL PRESS LOW {bar_lo}",
        "{asset}: {lub}.",
        "PM round: {tag} {lub}, topped up",
        "operator says {asset} {lub}",
        "{tech}: {lub} on {asset}. bearing itself sounds ok, no damage yet",
        "LUB FAULT {tag} - {lub}",
        "oil sample {tag}: {lub}",
        "{asset} {side} bearing slightly warm ({temp_mild}) because {lub}; regreased and monitoring",
        "WO {wo}: restore lubrication on {asset} - {lub}",
        "Shift log {shift}: {tag} {lub}. Added {liters} L oil",
        "{tag} squealing, {lub}",
        "grease gun check on {asset}: {lub}",
        "relube schedule overdue on {tag}, {lub}",
        "found {lub} on {asset}; no leak found at seals",
        "{asset}: {lub}, vibration normal {vib_lo}",
        "auto-lube controller {tag} alarm, {lub}",
        "{tag} gearbox oil dark and smells burnt, {lub}",
        "Tech report {date}: {lub}. Recommend relube interval of {hrs} h",
        "pls grease {tag} asap, {lub}",
        "lubrication route {tag} {side_code}: {lub}",
        "Maintenance request: {asset} needs grease, {lub}",
        "Handover note: {tag} {lub}",
        "LUBE LVL LOW {tag} {side_code}",
        "{asset}: {lub}; temperature still normal at {temp_ok}",
        "{tech} on route: {lub} at {tag}, fixed",
        "{date} oil change due on {asset}, {lub}",
        "{asset} running warm ({temp_mild}), {lub}",
        "{tag} {lub}, please schedule lube",
        "{tech}: {lub} on {asset}, temperature OK, no vibration change",
        "{asset} oil level low after seal check, {lub}",
    ),
    "misalignment": (
        "ALM {alm} {tag} AXIAL VIB HIGH {vib_hi}",
        "{asset}: {mis}.",
        "Vib analysis {tag}: {mis}, recommend realignment",
        "{tech} checked {asset}: {mis}. Bearings OK, no defect frequencies",
        "after motor swap on {asset}, {mis}",
        "Shift log {shift}: {tag} shaking at the coupling, {mis}",
        "WO {wo} realign {asset} - {mis}",
        "{asset} coupling side vibrating, {mis}",
        "alignment check {date} {tag}: offset {mm} mm vertical, {mm2} mm horizontal, out of tolerance",
        "{tag} drive end bearing running warm ({temp_mild}) due to {mis}",
        "operator noted {asset} {mis}",
        "MISALIGN {tag} {side_code} 2X {vib_hi}",
        "belt drive {tag}: {mis}",
        "{asset}: {mis}; lubrication fine, grease ok",
        "coupling on {tag} running hot and noisy, {mis}",
        "pls realign {tag}, {mis}",
        "CM report: {mis} on {asset}",
        "{tag} shakes since the foundation work, {mis}",
        "{asset} vibration {vib_hi} mostly axial, {mis}",
        "new pump {tag} commissioned last week, {mis}",
        "Maintenance request: {asset} vibrating since coupling change, {mis}",
        "Handover note: {tag} {mis}",
        "ALIGN OUT OF TOL {tag} {mm} mm",
        "{asset}: {mis}; no grinding noise, bearings fine",
        "{tech}: {mis} on {asset}, dial indicator confirms",
        "{date} {asset} vib {vib_hi} at 2x, {mis}",
        "{asset} coupling temp {temp_mild}, {mis}",
        "{tag} {mis}, schedule laser alignment",
        "{asset}: {mis}; bearing noise normal, no leak",
        "{tech}: bearings replaced but vibration still high, {mis}",
    ),
    "electrical_fault": (
        "ALM {alm} {tag} OVERCURRENT {amp}",
        "{asset}: {elec}.",
        "{tag} tripped at {time}, {elec}",
        "Electrician {tech}: {elec} on {asset}",
        "DRIVE FAULT {tag} {vfd_code}",
        "Shift log {shift}: {asset} would not restart, {elec}",
        "megger test {tag}: {elec}",
        "{asset} terminal box hot, {elec}",
        "MCSA {tag}: {elec}",
        "WO {wo} - electrical - {asset} - {elec}",
        "{asset} humming loudly, {elec}, mechanical side OK",
        "operator: lights flickered and {tag} stopped; {elec}",
        "{tag} vibration at 2x line frequency, {elec}",
        "E-FAULT {tag} GF {ma} mA",
        "{asset}: {elec}; sensors checked and reading correctly",
        "thermal scan of the panel for {tag}: {elec}",
        "{tag} keeps tripping the breaker, {elec}",
        "contactor chatter on {asset} starter, {elec}",
        "pls send electrician to {tag}, {elec}",
        "{asset} started with a bang, {elec}",
        "Maintenance request: {asset} motor trips on start, {elec}",
        "Handover note: {tag} {elec}",
        "MTR PROT TRIP {tag} {vfd_code}",
        "{asset}: {elec}; bearings and cooling fine",
        "{tech}: {elec} at the {asset} MCC, isolated",
        "{date} {asset} tripped {n_weeks} times this week, {elec}",
        "{asset} cable hot to the touch at the terminals, {elec}",
        "{tag} won't stay running, {elec}",
        "infrared check on {tag} starter: {elec}",
        "{tech}: {elec}; temperature and vibration normal",
    ),
    "sensor_failure": (
        "ALM {alm} {tag} SENSOR FAULT CH{ch}",
        "{asset}: {sens}.",
        "BAD PV {tag}-{sig_type}{ch}",
        "{tag} temp alarm {temp_hi} but handheld IR gun shows {temp_ok}, {sens}",
        "I&C tech {tech}: {sens} on {asset}",
        "vibration alarm on {tag} is false, {sens}",
        "Shift log {shift}: {asset} {sens}, machine itself running normally",
        "WO {wo} replace transmitter on {asset}: {sens}",
        "DCS shows {tag} {sens}",
        "instrument check {tag}: {sens}",
        "{asset} high vib reading {vib_hi} not confirmed by portable analyser, {sens}",
        "SIG FAIL {tag} {sig_type} CH{ch}",
        "monitoring dashboard {tag}: {sens}",
        "{tag} leak detector alarm, but no leak found, {sens}",
        "operator: readings on {asset} look wrong, {sens}",
        "{sens} on {tag}; process values normal on the redundant sensor",
        "pls check the instrument on {tag}, {sens}",
        "loop check {date} {tag}: {sens}",
        "{tag} shows {temp_crazy} on the HMI, {sens}",
        "trend for {asset} has gaps every few minutes, {sens}",
        "Maintenance request: instrument on {asset} faulty, {sens}",
        "Handover note: ignore the {tag} readings, {sens}",
        "IO FAULT {tag} CH{ch} OPEN WIRE",
        "{asset}: {sens}; real temperature normal by hand check",
        "{tech}: {sens} at {tag}, sensor swapped",
        "{date} {asset} readings frozen, {sens}",
        "{asset} temp reading {temp_hi} but casing cold to touch, {sens}",
        "{tag} {sens}, needs I&C",
        "{asset} shows vib {vib_hi}, not real, {sens}",
        "{tech}: {sens}; machine checked, no leak, no noise",
    ),
    "leak": (
        "ALM {alm} {tag} LOW LEVEL - possible loss of fluid",
        "{asset}: {leak}.",
        "Operator: {leak} at {tag}",
        "{tech}: {leak} on {asset}. temperature normal, vibration normal",
        "Shift log {shift}: {asset} {leak}, drip tray placed",
        "WO {wo} replace seal {asset} - {leak}",
        "walkdown {date}: {tag} {leak}",
        "{asset} {leak}; bearings and alignment ok",
        "SEAL FAIL {tag} {side_code}",
        "housekeeping complaint: {leak} near {asset}",
        "{tag} oil level keeps dropping, topping up {liters} L per day, {leak}",
        "found {leak} on {asset} during PM, no overheating",
        "{asset}: {leak}, lube level adequate after top-up",
        "pls fix {tag}, {leak}",
        "environmental report: {leak} at {asset}, absorbent placed",
        "{tag} pressure decay test failed, {leak}",
        "{asset} losing pressure, {leak}",
        "EHS report {date}: {leak} at {tag}",
        "{tag} floor wet every morning, {leak}",
        "{asset} makeup water consumption doubled, {leak}",
        "Maintenance request: {asset} leaking, {leak}",
        "Handover note: {tag} {leak}",
        "LEAK DET {tag} {side_code}",
        "{asset}: {leak}; no noise, temp fine",
        "{tech}: {leak} at {tag}, fitting tightened",
        "{date} {asset} {leak}, oil top-up needed",
        "{asset}: {leak}, temp {temp_ok} and vibration fine",
        "{tag} {leak}, needs new seal",
        "{tech}: oil level low on {asset}, {leak}",
        "{asset}: {leak}; bearing noise normal, no overheating",
    ),
    "normal": (
        "{asset}: {norm}.",
        "Shift log {shift}: {tag} running, {norm}, {norm2}",
        "PM completed on {asset}, {norm}",
        "route {date} {tag}: {norm}",
        "{tech}: checked {asset} after complaint, {norm}. no fault found",
        "OK {tag} vib {vib_lo} temp {temp_ok}",
        "{asset} back in service after bearing change, {norm}",
        "no leak, no noise, no heat on {tag}. {norm}",
        "walkdown {tag}: {norm}",
        "operator: {asset} runs fine, {norm}",
        "condition monitoring {tag}: good condition, {norm}",
        "follow-up on WO {wo} ({asset} overheating): {norm}",
        "{tag} restarted after planned shutdown, {norm}",
        "weekly check {asset}: {norm}; {norm2}",
        "STATUS {tag} NORMAL",
        "{tag} alarm was a scheduled test, {norm}",
        "no issues on {asset} this shift, {norm}",
        "verified {tag} after realignment: {norm}",
        "inspection {asset}: nothing abnormal, {norm}",
        "{asset} at {pct}% load all day, {norm}",
        "Maintenance request closed: {asset} checked, {norm}",
        "Handover note: {tag} fine, {norm}",
        "NO ALARM {tag} SHIFT OK",
        "{asset}: {norm}; {norm2}; {norm3}",
        "{tech}: {asset} inspected, {norm}",
        "{date} {asset} {norm}",
        "{asset} temperature {temp_ok} after the overheating repair, {norm}",
        "{tag} ok, {norm}",
        "{tech}: follow-up after leak repair on {asset}, {norm}",
        "{asset} regreased last month, {norm}",
    ),
}

PHRASES: dict[str, tuple[str, ...]] = {
    "brg": (
        "grinding noise at {side}",
        "high-frequency vibration peaks at BPFO",
        "envelope spectrum shows outer race defect frequency",
        "rumbling from the {side} housing",
        "excessive radial play on the shaft",
        "spalling visible on the outer race",
        "metal flakes in the grease at {side}",
        "shock pulse values rising, {spm} dBm",
        "BPFI harmonics with 1x sidebands",
        "kurtosis of the acceleration signal up to {kurt}",
        "cage frequency (FTF) visible in the spectrum",
        "brinelling marks on the inner ring",
        "growling noise that gets louder with speed",
        "acceleration up {pct}% in the 2-5 kHz band",
        "pitting on the rolling elements",
        "rough running, rollers feel notchy",
    ),
    "brg_noise": (
        "a grinding sound",
        "a rumbling noise",
        "a rough growl",
        "metallic scraping",
        "a rattling noise",
        "a whining rolling noise",
        "crunching noise",
        "a screeching sound",
    ),
    "hot": (
        "motor winding temp {temp_hi}",
        "casing too hot to touch",
        "discharge temperature {temp_hi}, above limit",
        "thermal image shows hot spot of {temp_hi} on the motor frame",
        "fan cover clogged with dust, temp climbing",
        "cooling water flow low, outlet at {temp_hi}",
        "PTC thermistor relay tripped",
        "oil temperature {temp_hi}, rising {rate} K/h",
        "paint discoloured on the housing from heat",
        "heat exchanger fouled, delta T only {dt} K",
        "ambient {ambient} C and the unit running hot",
        "smell of hot oil around it",
        "radiator fins blocked, temperature alarm",
        "thermal overload trip after {hrs} h at full load",
        "stator RTD at {temp_hi} and climbing",
        "exhaust air much hotter than usual",
    ),
    "hot_cause": (
        "blocked cooling air inlet",
        "cooler fan not running",
        "intercooler fouled",
        "cooling water valve closed by mistake",
        "running continuously above rated load",
        "sun shield removed, direct sunlight",
        "broken fan blade on the motor",
        "insufficient lubrication suspected",
    ),
    "lub": (
        "grease looks dry and discoloured",
        "oil level below the min mark in the sight glass",
        "auto-lubricator cartridge empty",
        "grease nipple blocked at {side}",
        "oil milky, water in the lube oil",
        "lube oil pressure low at {bar_lo}",
        "central lube pump not cycling",
        "chain running dry and squeaking",
        "oil analysis: viscosity {visc}% off grade",
        "wrong grease type used, lithium mixed with polyurea",
        "relube interval overdue by {n_weeks} weeks",
        "over-greased, grease pushed out of the seals",
        "oil mist unit fault, no oil flow to the bearings",
        "varnish deposits, oil oxidised",
        "breather clogged and oil foaming",
        "lube line to the {side} bearing kinked",
    ),
    "mis": (
        "high axial vibration at 2x running speed",
        "laser alignment shows {mm} mm offset",
        "angular misalignment of {mrad} mm/100 mm at the coupling",
        "coupling insert worn unevenly",
        "1x and 2x peaks with 180 deg phase shift across the coupling",
        "soft foot on the motor feet, {mm} mm",
        "coupling guard warm, rubber element cracked",
        "belt running off the pulley edge, pulleys not in line",
        "motor moved on its base after maintenance",
        "pipe strain pulling the pump out of line",
        "shaft runout {mm} mm at the coupling hub",
        "thermal growth not compensated, cold alignment off",
        "axial vibration higher than radial",
        "coupling bolts loose, hub shifted",
        "uneven wear on both belt sides",
        "shims missing under the motor",
    ),
    "elec": (
        "motor tripped on overcurrent at {amp}",
        "insulation resistance only {mohm} MOhm",
        "phase imbalance {pct}% between L1 and L3",
        "burnt smell from the terminal box",
        "VFD fault code {vfd_code}",
        "earth fault relay operated",
        "current spikes to {amp} at start",
        "blown fuse on phase L2",
        "arcing marks on the contactor",
        "loose cable lug, terminal discoloured",
        "single phasing, motor humming and not starting",
        "sidebands at pole pass frequency, broken rotor bar suspected",
        "MCC breaker tripped twice",
        "supply voltage dipped to {volt} V",
        "partial discharge detected on the stator winding",
        "DC bus overvoltage on the drive",
    ),
    "sens": (
        "temperature reading jumps between -50 and 850 C",
        "vib sensor shows 0.00 mm/s while the machine is running",
        "PT100 open circuit",
        "4-20 mA signal below 3.6 mA, wire break",
        "accelerometer cable chafed, signal noisy",
        "pressure transmitter frozen at {bar} bar",
        "flow meter reads negative",
        "value flatlined since {time}",
        "thermocouple reading {temp_crazy}, physically impossible",
        "proximity probe gap voltage out of range",
        "bias error on channel {ch}",
        "level switch stuck, shows full while the tank is empty",
        "encoder counts missing, speed signal drops to 0",
        "calibration drift, reads {dt} K higher than the handheld",
        "connector corroded, signal intermittent",
        "transmitter loop power lost",
    ),
    "leak": (
        "oil dripping from the {side} seal",
        "puddle of oil under the baseplate",
        "mechanical seal leaking {drips} drops/min",
        "hydraulic hose weeping at the fitting",
        "water spraying from a flange gasket",
        "air hissing at the discharge line",
        "gland packing leaking more than normal",
        "oil mist around the breather, level dropping",
        "coolant loss of {liters} L per shift",
        "steam escaping at the valve stem",
        "process fluid on the baseplate",
        "ultrasonic detector shows {cfm} l/min air loss",
        "wet spot under the gearbox drain plug",
        "cracked sight glass, oil seeping out",
        "refrigerant loss found with the sniffer",
        "drops forming at the pipe union",
    ),
    "norm": (
        "all readings within limits",
        "vibration {vib_lo}, temp {temp_ok}",
        "no abnormal noise",
        "no leak found",
        "bearing replaced last week, running smooth now",
        "oil level OK, grease fresh",
        "alignment checked, within tolerance",
        "insulation test passed, {mohm_ok} MOhm",
        "sensor calibrated, matches reference",
        "running quietly at {rpm} rpm",
        "no alarms during the shift",
        "trend stable over the last {n_weeks} weeks",
        "previous overheating issue resolved, temp now {temp_ok}",
        "seals dry, no drips",
        "current balanced, {amp_ok} per phase",
        "routine inspection completed, nothing to report",
    ),
}

MACHINES: tuple[tuple[str, str, int, int], ...] = (
    ("pump", "P", 101, 140),
    ("conveyor", "CV", 1, 12),
    ("compressor", "K", 201, 215),
    ("gearbox", "GB", 1, 12),
    ("fan", "F", 10, 30),
    ("motor", "M", 30, 60),
    ("blower", "BL", 1, 6),
    ("agitator", "AG", 1, 8),
    ("mixer", "MX", 1, 9),
    ("extruder", "EX", 1, 4),
    ("cooling tower fan", "CT", 1, 4),
    ("hydraulic unit", "HPU", 1, 5),
)
ASSET_FORMS = ("{kind} {code}", "{code}", "{Kind} {code}", "{code} ({kind})", "{kind} {short}")
PREFIXES = ("", "", "", "", "URGENT: ", "FYI ", "Re: ", "[{shift}] ", "{date} {time} ")
SUFFIXES = ("", "", "", "", " pls check", " - {tech}", " /{tech}", " tbc", " see photo", " will monitor")
SHIFTS = ("night shift", "B-shift", "early shift", "late shift", "2nd shift", "weekend crew", "day shift")
TECHS = ("JK", "M. Ortega", "T. Lindqvist", "AB", "R. Singh", "K.W.", "P. Novak", "S.Chen", "dmitri")
ABBREVIATIONS: dict[str, str] = {
    "bearing": "brg",
    "temperature": "temp",
    "vibration": "vib",
    "motor": "mtr",
    "pressure": "press",
    "maintenance": "maint",
    "replaced": "repl",
    "please": "pls",
    "with": "w/",
    "inspection": "insp",
    "coupling": "cplg",
    "because": "bc",
    "operator": "op",
    "running": "rng",
    "approximately": "approx",
}
ABBREVIATION_RE = re.compile(r"\b(" + "|".join(ABBREVIATIONS) + r")\b", re.IGNORECASE)
ABBREVIATION_P = 0.4
TYPO_P = 0.3


def _pick(choices: tuple[str, ...]) -> Callable[[random.Random], str]:
    """Slot filler: one of ``choices``."""
    return lambda rng: rng.choice(choices)


def _temp(lo: int, hi: int) -> Callable[[random.Random], str]:
    """Slot filler: a temperature in degrees Celsius, written in one of several ways."""
    units = ("C", " C", "°C", " degC", " deg C")
    return lambda rng: f"{rng.randint(lo, hi)}{rng.choice(units)}"


def _vib(lo: float, hi: float) -> Callable[[random.Random], str]:
    """Slot filler: a vibration velocity in mm/s."""
    return lambda rng: f"{rng.uniform(lo, hi):.1f} {rng.choice(('mm/s', 'mm/s RMS', 'mm/s rms'))}"


def _int(lo: int, hi: int, fmt: str = "{}") -> Callable[[random.Random], str]:
    """Slot filler: an integer in [lo, hi] formatted with ``fmt``."""
    return lambda rng: fmt.format(rng.randint(lo, hi))


def _float(lo: float, hi: float, fmt: str) -> Callable[[random.Random], str]:
    """Slot filler: a float in [lo, hi] formatted with ``fmt``."""
    return lambda rng: fmt.format(rng.uniform(lo, hi))


def _date(rng: random.Random) -> str:
    """Slot filler: a day and month in one of three notations."""
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    return rng.choice((f"{day:02d}.{month:02d}", f"{day}/{month}", f"2024-{month:02d}-{day:02d}"))


NUMBERS: dict[str, Callable[[random.Random], str]] = {
    "vib_hi": _vib(4.5, 18.0),
    "vib_lo": _vib(0.6, 2.8),
    "temp_hi": _temp(85, 145),
    "temp_ok": _temp(28, 58),
    "temp_mild": _temp(62, 78),
    "temp_crazy": _pick(("-273 C", "999.9 C", "1372 C", "-50 C", "6553.5 degC")),
    "amp": _int(45, 420, "{} A"),
    "amp_ok": _int(20, 120, "{} A"),
    "mohm": _float(0.05, 1.8, "{:.2f}"),
    "mohm_ok": _int(150, 2500),
    "pct": _int(6, 45),
    "bar": _float(1.5, 12.0, "{:.1f}"),
    "bar_lo": _float(0.2, 0.9, "{:.1f} bar"),
    "mm": _float(0.12, 0.9, "{:.2f}"),
    "mrad": _float(0.08, 0.6, "{:.2f}"),
    "rpm": _pick(("740", "990", "1480", "1490", "2950", "2975")),
    "ch": _int(1, 24),
    "alm": _int(1000, 9999),
    "wo": _int(10000, 99999),
    "date": _date,
    "time": lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
    "n_weeks": _int(2, 10),
    "hrs": _int(2, 500),
    "liters": _int(1, 20),
    "drips": _int(5, 120),
    "cfm": _int(20, 400),
    "dt": _int(4, 25),
    "ambient": _int(36, 47),
    "rate": _int(2, 9),
    "kurt": _float(4.5, 14.0, "{:.1f}"),
    "spm": _int(35, 60),
    "ppm": _int(40, 400),
    "visc": _int(12, 40),
    "volt": _int(310, 370),
    "ma": _int(30, 900),
    "g_env": _float(2.0, 15.0, "{:.1f}"),
    "vfd_code": _pick(("F0001", "F30011", "OC2", "ERR 07", "F002", "E-21", "GF1", "OV3")),
    "sig_type": _pick(("TT", "VT", "PT", "FT", "ZT", "ST")),
    "side_code": _pick(("DE", "NDE", "MDE", "MNDE", "PDE", "PNDE")),
    "side": _pick(("DE", "NDE", "drive end", "non-drive end", "motor DE", "motor NDE", "pump side",
                   "inboard side", "outboard side", "fan side", "coupling end", "free end")),
    "brg_model": _pick(("6205-2RS", "6310 C3", "22216 E", "NU 312", "6316", "SKF 22220", "7312 BEP")),
    "shift": _pick(SHIFTS),
    "tech": _pick(TECHS),
}


def is_held_out(index: int) -> bool:
    """Whether template or phrase ``index`` of a class is reserved for the test split."""
    return index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def split_templates(label: str, split: str) -> list[str]:
    """Templates of ``label`` used by ``split``: held-out ones for test, the rest otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    test = split == "test"
    return [t for i, t in enumerate(TEMPLATES[label]) if is_held_out(i) == test]


class _Slots(dict[str, str]):
    """Lazily filled template slots for one report; a slot keeps its value within the report."""

    def __init__(self, rng: random.Random, split: str) -> None:
        super().__init__()
        self.rng = rng
        self.split = split
        self.used: set[str] = set()
        kind, prefix, lo, hi = rng.choice(MACHINES)
        number = rng.randint(lo, hi)
        code = f"{prefix}-{number}"
        form = rng.choice(ASSET_FORMS)
        self["tag"] = code
        self["asset"] = form.format(kind=kind, Kind=kind.capitalize(), code=code, short=f"{prefix}{number}")

    def __missing__(self, key: str) -> str:
        name = key.rstrip("0123456789")
        value = self._phrase(name) if name in PHRASES else NUMBERS[name](self.rng)
        self[key] = value
        return value

    def _phrase(self, name: str) -> str:
        """A phrase from pool ``name`` not yet used in this report, with its own slots filled."""
        pool = [p for i, p in enumerate(PHRASES[name]) if self.split == "test" or not is_held_out(i)]
        phrase = self.rng.choice([p for p in pool if p not in self.used] or pool)
        self.used.add(phrase)
        return phrase.format_map(self)


def _abbreviate(text: str, rng: random.Random) -> str:
    """Replace some words by their shop-floor abbreviations."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        return ABBREVIATIONS[word.lower()] if rng.random() < ABBREVIATION_P else word

    return ABBREVIATION_RE.sub(swap, text)


def _typo(text: str, rng: random.Random) -> str:
    """Introduce one typo (swap, drop or double a letter) into a longer word."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word, pos = words[i], rng.randint(1, len(words[i]) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        word = word[:pos] + word[pos + 1] + word[pos] + word[pos + 2 :]
    elif kind == 1:
        word = word[:pos] + word[pos + 1 :]
    else:
        word = word[:pos] + word[pos] + word[pos:]
    words[i] = word
    return " ".join(words)


def _case(text: str, rng: random.Random) -> str:
    """Occasionally shout or lowercase the whole report, as people type them."""
    roll = rng.random()
    return text.upper() if roll < 0.1 else text.lower() if roll < 0.3 else text


def render(template: str, rng: random.Random, split: str) -> str:
    """Fill ``template`` and add shop-floor noise; the result is one line without tabs."""
    slots = _Slots(rng, split)
    text = (rng.choice(PREFIXES) + template + rng.choice(SUFFIXES)).format_map(slots)
    text = _abbreviate(text, rng)
    if rng.random() < TYPO_P:
        text = _typo(text, rng)
    return " ".join(_case(text, rng).split())


def generate(seed: int, n_per_class: int, split: str) -> list[tuple[str, str]]:
    """``n_per_class`` distinct (label, text) reports per class for ``split``; deterministic."""
    reports: list[tuple[str, str]] = []
    for label in LABELS:
        templates = split_templates(label, split)
        rng = random.Random(f"{seed}/{split}/{label}")
        texts: dict[str, None] = {}
        for _ in range(n_per_class * 50):
            if len(texts) == n_per_class:
                break
            texts.setdefault(render(rng.choice(templates), rng, split))
        if len(texts) < n_per_class:
            raise RuntimeError(f"only {len(texts)} distinct {label} reports for {split}")
        reports.extend((label, text) for text in texts)
    return reports
