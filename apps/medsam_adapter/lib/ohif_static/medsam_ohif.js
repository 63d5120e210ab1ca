// medsam_adapter's additions to the OHIF viewer bundled with MONAI Label, appended to app-config.js
// by lib/ohif.py (no OHIF rebuild). An inline OHIF extension that
// - adds "Save Label" to the MONAI Label panel: the panel's labelmap (segmentation '1', where Run
//   draws) is sent as the panel's own unused save_label would, PUT /datastore/label with label.bin and
//   params.label_info [{name, idx}], plus the volume's grid so the server can check where it lies;
// - shows the model version that answered the last Run (X-Model-Version) and the training progress
//   of "Update Model" (the epochs, then DONE and the published version);
// - keeps a server address that is not a URL out of the panel (it would crash the whole viewer) and
//   points the panel at this server when no address was chosen yet.
(function () {
  'use strict';
  const viewer = window.MEDSAM_OHIF || {};
  const COOKIE = 'MONAILABEL_SERVER_URL';
  const LABELMAP = '1'; // the segmentation the MONAI Label panel creates and draws into
  let services = null;
  let polling = null;

  function validServer(value) {
    try {
      const url = new URL(value);
      return url.protocol === 'http:' || url.protocol === 'https:';
    } catch (e) {
      return false;
    }
  }

  function cookie(name) {
    const found = document.cookie.match('(^|;) ?' + name + '=([^;]*)(;|$)');
    return found ? unescape(found[2]) : null;
  }

  // The panel defaults to port 8000 of the page's host; this server is the one serving the page.
  if (!validServer(cookie(COOKIE) || '')) {
    document.cookie = COOKIE + '=' + escape(window.location.origin + '/');
  }

  if (viewer.dicomweb && window.config && Array.isArray(window.config.dataSources)) {
    for (const source of window.config.dataSources) {
      Object.assign(source.configuration, {
        qidoRoot: viewer.dicomweb,
        wadoRoot: viewer.dicomweb,
        wadoUriRoot: viewer.dicomweb,
        dicomUploadEnabled: false,
      });
    }
  }

  function notify(message, type = 'info', duration = 5000) {
    if (services && services.uiNotificationService) {
      services.uiNotificationService.show({ title: 'MONAI Label', message, type, duration });
    }
  }

  function serverUrl() {
    const input = document.getElementById('monailabelServerURL');
    const value = input ? input.value : cookie(COOKIE);
    return validServer(value) ? new URL(value).toString() : null;
  }

  function setText(id, text) {
    const element = document.getElementById(id);
    if (element) element.textContent = text;
  }

  // -- a bad server address gives a message instead of a crash -----------------------------------
  let lastGoodServer = cookie(COOKIE);
  function guardServerField(event) {
    const input = document.getElementById('monailabelServerURL');
    if (!input) return;
    const connect = event.type === 'click' && event.target.closest && event.target.closest('table.settingsTable button');
    if (event.target !== input && !connect) return;
    if (validServer(input.value)) {
      lastGoodServer = input.value;
      return;
    }
    event.stopImmediatePropagation();
    event.preventDefault();
    notify(`"${input.value}" is not a server address: use http://host:port/ (kept: ${lastGoodServer})`, 'error');
    setText('medsam-saved', 'Server address not changed: not a URL');
  }
  // capture phase on window: runs before React's own listeners on the root
  window.addEventListener('focusout', guardServerField, true);
  window.addEventListener('click', guardServerField, true);

  // -- the version that answered each Run ---------------------------------------------------------
  const open = XMLHttpRequest.prototype.open;
  XMLHttpRequest.prototype.open = function (method, url, ...rest) {
    const match = /\/infer\/([^/?]+)/.exec(String(url));
    if (match) {
      this.addEventListener('load', () => {
        const version = this.getResponseHeader('X-Model-Version');
        if (version) setText('medsam-model-version', `Model: ${version} (last Run: ${decodeURIComponent(match[1])})`);
      });
    }
    return open.call(this, method, url, ...rest);
  };

  // -- training progress --------------------------------------------------------------------------
  async function refreshTraining() {
    const url = serverUrl();
    if (!url) return false;
    let running = false;
    try {
      const task = await fetch(new URL('train/', url)).then((r) => (r.ok ? r.json() : null));
      running = Boolean(task && task.status === 'RUNNING');
      const info = await fetch(new URL('info/', url)).then((r) => (r.ok ? r.json() : null));
      const stats = info && info.train_stats ? Object.values(info.train_stats)[0] : null;
      if (stats && stats.status) {
        let text = `Training: epoch ${stats.epoch || 0}/${stats.total_epochs || '?'} ${running ? 'RUNNING' : stats.status}`;
        if (!running && stats.status === 'DONE') {
          text = stats.published_version
            ? `Training: DONE, published v${stats.published_version}`
            : 'Training: DONE, nothing published (the served model stays)';
        } else if (!running && stats.status === 'ERROR') {
          text = `Training: ERROR ${stats.error || ''}`;
        }
        setText('medsam-training', text);
      }
    } catch (e) {
      setText('medsam-training', `Training: status unavailable (${e.message})`);
    }
    return running;
  }

  function followTraining() {
    if (polling) return;
    let idleChecks = 0;
    polling = setInterval(async () => {
      const running = await refreshTraining();
      idleChecks = running ? 0 : idleChecks + 1;
      if (idleChecks >= 2) {
        clearInterval(polling);
        polling = null;
      }
    }, 3000);
  }

  window.addEventListener(
    'click',
    (event) => {
      const button = event.target.closest && event.target.closest('button');
      if (button && /Update Model|Stop Training/.test(button.textContent)) setTimeout(followTraining, 500);
    },
    true
  );

  // -- Save Label ---------------------------------------------------------------------------------
  function activeSeries() {
    const { viewportGridService, displaySetService } = services;
    const { viewports, activeViewportId } = viewportGridService.getState();
    const viewport = viewports.get(activeViewportId);
    const displaySet = displaySetService.getDisplaySetByUID(viewport.displaySetInstanceUIDs[0]);
    return displaySet.SeriesInstanceUID;
  }

  function segmentNames() {
    const { segmentationService } = services;
    const segmentation = segmentationService.getSegmentation(LABELMAP);
    const segments = (segmentation && (segmentation.segments || (segmentation.config && segmentation.config.segments))) || {};
    const names = {};
    for (const [index, segment] of Object.entries(segments)) {
      if (segment && segment.label) names[Number(index)] = segment.label;
    }
    return names;
  }

  async function saveLabel() {
    const url = serverUrl();
    if (!url) return notify('Set the MONAI Label server address first', 'error');
    const volume = services.segmentationService.getLabelmapVolume(LABELMAP);
    if (!volume) return notify('Nothing to save: connect and Run a model first', 'error');
    const data = Uint8Array.from(volume.voxelManager.getCompleteScalarDataArray());
    const counts = new Map();
    for (let i = 0; i < data.length; i++) {
      if (data[i]) counts.set(data[i], (counts.get(data[i]) || 0) + 1);
    }
    if (!counts.size) return notify('Nothing to save: the label is empty', 'error');
    const names = segmentNames();
    const labelInfo = [...counts.keys()].sort((a, b) => a - b).map((idx) => ({ name: names[idx] || `segment_${idx}`, idx }));
    const params = {
      label_info: labelInfo,
      client_id: 'ohif',
      ohif_grid: {
        dimensions: Array.from(volume.dimensions),
        spacing: Array.from(volume.spacing),
        origin: Array.from(volume.origin),
        direction: Array.from(volume.direction),
      },
    };
    const image = activeSeries();
    const form = new FormData();
    form.append('params', JSON.stringify(params));
    form.append('label', new Blob([data]), 'label.bin');
    const target = new URL('datastore/label', url);
    target.searchParams.append('image', image);
    setText('medsam-saved', 'Saving…');
    try {
      const response = await fetch(target, { method: 'PUT', body: form });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        const detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail || body);
        setText('medsam-saved', `Not saved: ${detail}`);
        return notify(`Label not saved (${response.status}): ${detail}`, 'error', 10000);
      }
      const summary = labelInfo.map((l) => `${l.name} (${counts.get(l.idx)} voxels)`).join(', ');
      setText('medsam-saved', `Saved: ${summary}`);
      notify(`Label saved for training: ${summary}`, 'success');
    } catch (e) {
      setText('medsam-saved', `Not saved: ${e.message}`);
      notify(`Label not saved: ${e.message}`, 'error', 10000);
    }
  }

  // -- the panel's additions ----------------------------------------------------------------------
  function addControls() {
    if (document.getElementById('medsam-ohif')) return;
    const settingsTable = document.querySelector('.monaiLabelPanel table.settingsTable');
    if (!settingsTable) return;
    const box = document.createElement('div');
    box.id = 'medsam-ohif';
    box.style.cssText = 'color: white; font-size: smaller; margin: 6px 0;';
    const button = document.createElement('button');
    button.id = 'medsam-save-label';
    button.className = 'actionInput';
    button.style.cssText = 'background-color: lightgray; width: 100%; margin-bottom: 4px;';
    button.textContent = 'Save Label';
    button.title = 'Store the current MONAI Label labelmap as a final label (DICOM-SEG in the PACS, or labels/final)';
    button.addEventListener('click', saveLabel);
    box.appendChild(button);
    for (const [id, text] of [
      ['medsam-saved', 'Nothing saved yet'],
      ['medsam-model-version', 'Model: (Run to see the version)'],
      ['medsam-training', 'Training: –'],
    ]) {
      const line = document.createElement('div');
      line.id = id;
      line.textContent = text;
      box.appendChild(line);
    }
    settingsTable.parentNode.insertBefore(box, settingsTable.nextSibling);
    refreshTraining();
  }

  window.config.extensions = window.config.extensions || [];
  window.config.extensions.push({
    id: 'medsam-adapter-ohif',
    preRegistration({ servicesManager }) {
      services = servicesManager.services;
      let queued = false;
      new MutationObserver(() => {
        if (queued) return;
        queued = true;
        requestAnimationFrame(() => {
          queued = false;
          addControls();
        });
      }).observe(document.body, { childList: true, subtree: true });
    },
  });
})();
